"""Least-privilege NATS permissions for each llmbus role, as pure functions (`llmbus nats-permissions` prints them).

- **worker**: subscribes only to its endpoints (queue-qualified), the cancel subject, `llm.worker.left`, the `$SRV`
  discovery subjects and its own inbox; publishes replies (`allow_responses`), plus the queries of the batches it
  spreads over the queue group (the chat subject and their cancels), `$SRV.PING` (to share a host's cores with its
  peers) and `llm.worker.left` (when it leaves the bus).
  With `durable` it also calls the JetStream API for the jobs stream and its consumer, acks jobs, and publishes
  answers to the clients' inboxes. A worker runs with its own inbox prefix (default `_INBOX.worker`).
- **client**: publishes only requests, cancels and `$SRV` PING/INFO; subscribes only to its own inbox prefix.
- **gateway**: a client that may also ask for `$SRV.STATS`.

`allow_responses` for streams: `max: -1` (any number of replies per request; `true`, `{}` or `max: 0` allow ONE,
which cuts a stream after its first chunk) with `expires` 1h (counted from the request's delivery; the server's
default is 2 minutes, which cuts long streams, and a negative value never frees the server's reply entry).

Inbox prefixes are `_INBOX.<name>`, exactly one name token below `_INBOX`: NATS wildcards match whole tokens, so a
durable worker's one `_INBOX.>` covers every client, while each client may read only `_INBOX.<name>.>`, and two
different names never nest (`_INBOX.alice.>` would cover a prefix `_INBOX.alice.bob`). The bare `_INBOX` (every
answer), a prefix outside `_INBOX` (`llm`: every prompt) and another role's `_INBOX.<role>` (`_INBOX.worker` holds
the jobs the workers pull) are refused. A client has no default: each user needs a name of their own. Workers
share `_INBOX.worker` by default (and gateways `_INBOX.gateway`): each of them already reads every request sent
to it, and their inboxes carry only their own queries, JetStream replies and pulled jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from schemas.subjects import DEFAULT_PREFIX, DEFAULT_QUEUE_GROUP, JOBS_STREAM, SERVICE_NAME, Subjects, model_token

Role = Literal["worker", "client", "gateway"]
ROLES: tuple[Role, ...] = get_args(Role)

RESPONSE_EXPIRES = "1h"  # a stream may last this long after its request was delivered
RESPONSE_EXPIRES_NS = 3600 * 1_000_000_000
INBOX_ROOT = "_INBOX"
SRV_VERBS = ("PING", "INFO", "STATS")

TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")  # matched with fullmatch: `$` alone also matches before an end "\n"
SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True, slots=True)
class Grants:
    """What one role may do on the bus: subjects it may publish to and subscribe to, and whether it answers
    requests (a reply to whatever reply subject a request names, any number of times, for RESPONSE_EXPIRES)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool


def default_inbox_prefix(role: Role) -> str:
    return f"{INBOX_ROOT}.{role}"


def check_names(subject_prefix: str, inbox_prefix: str | None, queue_group: str) -> str | None:
    """The problem with these names, or None. Subjects must be literal dotted tokens (no wildcards, no spaces)."""
    if not SUBJECT.fullmatch(subject_prefix):
        return f"invalid subject prefix {subject_prefix!r}: use dotted tokens of A-Z a-z 0-9 _ - (no wildcards)"
    if inbox_prefix is not None and not SUBJECT.fullmatch(inbox_prefix):
        return f"invalid inbox prefix {inbox_prefix!r}: use dotted tokens of A-Z a-z 0-9 _ -, e.g. _INBOX.alice"
    if not TOKEN.fullmatch(queue_group):
        return f"invalid queue group {queue_group!r}: use one token of A-Z a-z 0-9 _ -"
    return None


def check_inbox_prefix(role: Role, inbox_prefix: str | None) -> str | None:
    """The problem with `role`'s inbox prefix, or None: it must be `_INBOX.<name>` with one name token, and not
    another role's `_INBOX.<role>`. A client must name one (no two users may share an inbox); a worker and a gateway
    default to their role's."""
    example = f"{INBOX_ROOT}.<name>, e.g. {INBOX_ROOT}.alice"
    if inbox_prefix is None:
        if role == "client":
            return f"a client needs its own inbox prefix: pass --inbox-prefix {example} (one name per user)"
        return None
    if not SUBJECT.fullmatch(inbox_prefix):
        return f"invalid inbox prefix {inbox_prefix!r}: use dotted tokens of A-Z a-z 0-9 _ -, e.g. {INBOX_ROOT}.alice"
    root, _, name = inbox_prefix.partition(".")
    if root != INBOX_ROOT:
        return f"invalid inbox prefix {inbox_prefix!r}: use {example} ({inbox_prefix}.> is not an inbox of its own)"
    if not name:
        return f"invalid inbox prefix {inbox_prefix!r}: it is the root of every inbox (every answer); use {example}"
    if "." in name:
        return (
            f"invalid inbox prefix {inbox_prefix!r}: use exactly one name below {INBOX_ROOT} ({example}), so that no"
            f" inbox lies inside another ({INBOX_ROOT}.{name.split('.')[0]}.> would cover this one)"
        )
    if name in ROLES and name != role:
        return f"invalid inbox prefix {inbox_prefix!r}: it is the {name}s' inbox; give this {role} a name of its own"
    return None


def grants(
    role: Role,
    subject_prefix: str = DEFAULT_PREFIX,
    inbox_prefix: str | None = None,
    durable: bool = False,
    queue_group: str = DEFAULT_QUEUE_GROUP,
    service: str = SERVICE_NAME,
    model: str | None = None,
) -> Grants:
    """The grants of `role`. `inbox_prefix` is the role's own reply inbox prefix, `_INBOX.<name>` (check_inbox_prefix):
    required for a client, `_INBOX.<role>` by default for a worker or a gateway. A worker's `model` (its served name)
    narrows its per-model subjects to that model's; without it, any model's."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if problem := check_names(subject_prefix, inbox_prefix, queue_group) or check_inbox_prefix(role, inbox_prefix):
        raise ValueError(problem)
    subjects = Subjects(subject_prefix)
    inbox = f"{inbox_prefix or default_inbox_prefix(role)}.>"
    if role == "worker":
        token = model_token(model) if model else "*"
        return worker_grants(subjects, inbox, durable, queue_group, service, token)
    publish = [
        subjects.chat,
        subjects.chat_batched,
        f"{subjects.prefix}.model.*.chat",
        f"{subjects.prefix}.model.*.chat.batched",
        subjects.cancel_all,
        f"$SRV.PING.{service}",
        f"$SRV.INFO.{service}",
    ]
    if role == "gateway":
        publish.append(f"$SRV.STATS.{service}")
    if durable:
        publish += [subjects.jobs_chat, subjects.jobs_chat_batched, f"{subjects.prefix}.jobs.model.*.>"]
    return Grants(publish=tuple(publish), subscribe=(inbox,), responds=False)


def worker_grants(
    subjects: Subjects, inbox: str, durable: bool, queue_group: str, service: str, token: str = "*"
) -> Grants:
    """A worker answers requests, and is also a client of its peers: it spreads the queries of a batch over the queue
    group (publishing them on the chat subject, cancelling them, reading their answers in its own inbox) and counts
    the workers on its host (`$SRV.PING`) to share the cores."""
    own = f"{subjects.prefix}.model.{token}"
    subscribe = [f"{subjects.chat} {queue_group}", f"{subjects.chat_batched} {queue_group}"]
    subscribe += [f"{own}.chat {queue_group}", f"{own}.chat.batched {queue_group}", subjects.cancel_all]
    subscribe.append(subjects.worker_left)  # a peer leaving: look at the bus again before forwarding to its model
    subscribe += [f"$SRV.{verb}{suffix}" for verb in SRV_VERBS for suffix in ("", f".{service}", f".{service}.*")]
    subscribe.append(inbox)  # answers to the batch queries it sent; JetStream API replies and pulled jobs
    models = f"{subjects.prefix}.model.*"  # forwarding a request for another model, and a batch's queries
    publish = [subjects.chat, f"{models}.chat", f"{models}.chat.batched", subjects.cancel_all, f"$SRV.PING.{service}"]
    publish += [f"$SRV.INFO.{service}", subjects.worker_left]  # which models are on the bus; this worker leaving
    if durable:
        api = "$JS.API"
        consumers = "*"  # `llm-workers` (model-less jobs) and `llm-workers-<token>` (one model's): one token each
        publish += [
            f"{api}.STREAM.INFO.{JOBS_STREAM}",
            f"{api}.STREAM.CREATE.{JOBS_STREAM}",
            f"{api}.CONSUMER.INFO.{JOBS_STREAM}.{consumers}",
            f"{api}.CONSUMER.DURABLE.CREATE.{JOBS_STREAM}.{consumers}",
            f"{api}.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{consumers}",
            f"$JS.ACK.{JOBS_STREAM}.{consumers}.>",
            f"{subjects.prefix}.jobs.model.*.>",  # a job for another model, forwarded to that model's queue
            subjects.jobs_chat,  # a model-less job that a clean shutdown interrupted, stored again (durable.requeue)
            subjects.jobs_chat_batched,
            f"{INBOX_ROOT}.>",  # answers to the clients' inboxes (Llmbus-Reply-To; the worker checks the prefix)
        ]
    return Grants(publish=tuple(publish), subscribe=tuple(subscribe), responds=True)


def server_permissions(g: Grants) -> dict[str, Any]:
    """The `permissions` block of a user entry in a nats-server config.

    An empty publish allow list denies every publish (the worker then publishes replies only); subscribe lists
    are never empty (an empty subscribe allow list would allow everything)."""
    block: dict[str, Any] = {"publish": {"allow": list(g.publish)}, "subscribe": {"allow": list(g.subscribe)}}
    if g.responds:
        block["allow_responses"] = {"max": -1, "expires": RESPONSE_EXPIRES}
    return block


def jwt_permissions(g: Grants) -> dict[str, Any]:
    """The same grants as the permission fields of a user JWT's `nats` claims (nats-io/jwt v2: pub, sub, resp)."""
    # An absent (or empty) pub allow list means "anything"; with resp set the server turns it into replies only.
    claims: dict[str, Any] = {"pub": {"allow": list(g.publish)} if g.publish else {}}
    claims["sub"] = {"allow": list(g.subscribe)}
    if g.responds:
        claims["resp"] = {"max": -1, "ttl": RESPONSE_EXPIRES_NS}
    return claims
