"""`llmbus nats-permissions`: which inbox prefixes each role may be given. A client may read only `_INBOX.<name>.>`
with one name of its own: not the root (every answer), not a prefix outside `_INBOX` (`llm.>`: every prompt), not
another role's inbox (`_INBOX.worker` holds the jobs the workers pull), and never one nested in another's."""

from __future__ import annotations

import json

import pytest

from llmbus.cli import main
from llmbus.permissions import grants


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["nats-permissions", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("role", "prefix", "problem"),
    [
        ("client", "_INBOX", "root of every inbox"),  # _INBOX.>: every answer
        ("gateway", "_INBOX", "root of every inbox"),
        ("worker", "_INBOX", "root of every inbox"),
        ("client", "llm", "use _INBOX.<name>"),  # llm.>: every prompt
        ("client", "alice", "use _INBOX.<name>"),
        ("gateway", "llm.inbox", "use _INBOX.<name>"),
        ("client", "_INBOX.worker", "the workers' inbox"),  # the jobs the workers pull
        ("client", "_INBOX.gateway", "the gateways' inbox"),  # every HTTP user's answers
        ("gateway", "_INBOX.worker", "the workers' inbox"),
        ("gateway", "_INBOX.client", "the clients' inbox"),
        ("worker", "_INBOX.gateway", "the gateways' inbox"),
        ("worker", "_INBOX.client", "the clients' inbox"),
        ("client", "_INBOX.alice.bob", "exactly one name below _INBOX"),  # inside _INBOX.alice.>
        ("client", "_INBOX.worker.eve", "exactly one name below _INBOX"),  # inside the workers' inbox
        ("gateway", "_INBOX.gw.1", "exactly one name below _INBOX"),
    ],
)
def test_prefixes_that_reach_others_traffic_are_refused(
    capsys: pytest.CaptureFixture[str], role: str, prefix: str, problem: str
) -> None:
    code, out, err = run(capsys, "--role", role, "--inbox-prefix", prefix)
    assert (code, out) == (2, "")
    assert err.startswith(f"llmbus: error: invalid inbox prefix {prefix!r}: ") and err.count("\n") == 1, err
    assert problem in err


def test_a_client_without_an_inbox_prefix_is_told_to_pass_one_per_user(capsys: pytest.CaptureFixture[str]) -> None:
    """Without it every client would share one inbox, and read the others' answers."""
    for durable in ((), ("--durable",)):
        code, out, err = run(capsys, "--role", "client", *durable)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and "client needs its own inbox prefix" in err, err
        assert "--inbox-prefix _INBOX.<name>" in err and "one name per user" in err
    with pytest.raises(ValueError, match="client needs its own inbox prefix"):
        grants("client")


@pytest.mark.parametrize(
    ("role", "prefix", "inbox"),
    [
        ("client", "_INBOX.alice", "_INBOX.alice.>"),
        ("client", "_INBOX.client", "_INBOX.client.>"),  # `llmbus up --secure`'s one client login
        ("gateway", None, "_INBOX.gateway.>"),  # gateways share theirs by default, as workers do
        ("gateway", "_INBOX.gw-eu", "_INBOX.gw-eu.>"),
        ("worker", None, "_INBOX.worker.>"),
        ("worker", "_INBOX.worker", "_INBOX.worker.>"),
        ("worker", "_INBOX.gpu-7", "_INBOX.gpu-7.>"),
    ],
)
def test_exactly_one_name_below_inbox_is_accepted(
    capsys: pytest.CaptureFixture[str], role: str, prefix: str | None, inbox: str
) -> None:
    """The role's own inbox and nothing wider; one more token (a prefix nested inside it) is refused."""
    code, out, _ = run(capsys, "--role", role, *(("--inbox-prefix", prefix) if prefix else ()))
    assert code == 0
    subscribe = json.loads(out)["subscribe"]["allow"]
    assert [s for s in subscribe if s.startswith("_INBOX")] == [inbox]
    nested = inbox.removesuffix(".>") + ".eve"
    code, out, err = run(capsys, "--role", role, "--inbox-prefix", nested)
    assert (code, out) == (2, "") and "exactly one name below _INBOX" in err, err
