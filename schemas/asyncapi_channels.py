"""The channels and operations of the AsyncAPI document (`schemas/asyncapi.py`): the bus subjects clients send to,
the reply subjects they read, and the `$SRV` discovery subjects.

Channels are subjects; operations are written from a client's point of view (`action: send`, with a `reply` where
an answer comes). Reply subjects are dynamic: the reply channels have `address: null`, and a durable job's reply
address is its `Llmbus-Reply-To` header. What AsyncAPI cannot say (several messages, then an end message, then an
empty one) is spelled out in the operations' descriptions.
"""

from __future__ import annotations

from typing import Any

from schemas.subjects import DEFAULT_QUEUE_GROUP, JOBS_STREAM, SERVICE_NAME, Subjects

Doc = dict[str, Any]
DISCOVERY = "$SRV"
VERBS = ("PING", "INFO", "STATS")
TOKEN, REQUEST = "MODELTOKEN", "REQUESTID"  # valid subject tokens, replaced by the channel parameters
REPLY_TO_LOCATION = "$message.header#/Llmbus-Reply-To"

SINGLE = ["ChatResponse", "Error"]
STREAM = ["ChatChunk", "ChatStreamEnd", "Error", "StreamSentinel"]
BATCH = ["BatchResponse", "BatchFailed", "Error"]
BATCH_STREAM = ["BatchItemDone", "BatchDone", "Error", "StreamSentinel"]

CHAT = """Request-reply with one answer: send a ChatRequest (without `stream`) with a reply subject and read one
message: a `ChatResponse`, or an error answer. A request for a model that no worker serves is `model_not_found`, and
its message lists the models on the bus."""

CHAT_STREAM = """A streamed answer: send a ChatRequest with `"stream": true` (and a `Llmbus-Request-Id`, to cancel
it later) with a reply subject you subscribe to, and read, in order:
1. the accepted chunk (`index` 0, empty `delta`), as soon as a worker's engine has taken the request (a request
   refused before that, or cancelled before it came, gets only the end message and the sentinel);
2. one `ChatChunk` per text delta (`index` counts up; a delta never splits a UTF-8 character nor holds the start of
   a stop string);
3. the end message (`Llmbus-Stream: end`): `done: true` with `finish_reason`, `usage` and `model`, or an error answer;
4. an empty message, the sentinel.

Stop at the end message, at the sentinel, or at any error answer: a request whose body cannot be decoded gets a
single error answer, without `Llmbus-Stream: end` and without a sentinel. Every message but the sentinel carries
`Llmbus-Request-Id` (when the one sent was valid)."""

BATCHED = """Request-reply with one answer: a `BatchResponse` with every query's result in input order (a failed
query is `{chat_id, error, code}`, its error naming its position, such as `$.queries[3].top_p`), with
`partial_success` and a `message` when some failed. When every query failed, the answer is an error answer whose body
is still the BatchResponse (`BatchFailed`). A bad envelope (undecodable, empty `queries`, more queries than the
workers' `--max-batch-queries`) is an error answer with an ErrorBody. The queries are spread over every worker of the
model, each as its own chat request; a query must not set `stream`."""

BATCHED_STREAM = """A streamed batch (`"stream": true` on the batch): one `BatchItemDone` per query as soon as its
result is ready (in completion order; `index` is its position in `queries`), then `BatchDone` (`Llmbus-Stream: end`)
with the counts, then the empty sentinel. Every message but the sentinel carries the batch's `Llmbus-Request-Id`;
cancelling it stops the queries still running. Stop at `BatchDone`, at the sentinel, or at any error answer: a batch
that fails before it runs (undecodable, too many queries, a bad `Llmbus-Request-Id`, cancelled first) gets a single
error answer, without `Llmbus-Stream: end` and without a sentinel."""

PER_MODEL = "The same on one model's subject: only that model's workers receive it."

CANCEL = """Fire and forget: publish anything to the cancel subject of a request id, with `Llmbus-Reply-To` set to
that request's reply subject (a cancel names its request by both; an id alone cancels nothing). There is no answer.
The worker that holds the request frees its slot at the next decode step: a stream ends with `finish_reason:
"cancelled"`, a single answer comes with it, a batch ends with the `cancelled` error. A cancel that arrives before its
request makes that request answer `cancelled` at once."""

JOB = """A durable job: publish with JetStream (and wait for the PubAck) with the headers `Llmbus-Reply-To` (an inbox
subject you subscribe to), `Llmbus-Request-Id`, and `Nats-Msg-Id` equal to `Llmbus-Reply-To` (a re-publish is then
stored once; a PubAck with `duplicate: true` on a first publish means that the reply subject was used before). The job
stays stored until a worker has published its one answer on `Llmbus-Reply-To` (with `Llmbus-Request-Id`) and acked
it. A worker that dies leaves the job to be redelivered, so an answer may come twice: keep the first per request id.
A retryable failure is redelivered after a growing delay; the last delivery answers an error. `stream` is not
available on durable jobs."""

WORKER_LEFT = """Between workers: a worker that leaves the bus (a drain, or an engine that died) publishes a
`WorkerLeft` once it has left its queue groups and discovery. Every worker subscribes (no queue group) and looks at
the bus again before it forwards another request for that model, so a request for a model whose last worker left is
a `model_not_found` at once rather than a timeout. A client may listen to watch workers leave; it never publishes."""

DISCOVERY_TEXT = """NATS micro discovery (ADR-32): send an empty request; every service instance in scope answers
once (`nats micro ls/info/stats llm-inference`), so collect answers until a short quiet period."""


def _messages(channel: str, names: list[str]) -> list[Doc]:
    return [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names]


def _channel(address: str | None, title: str, description: str, names: list[str], *parameters: str) -> Doc:
    channel: Doc = {"address": address, "title": title, "description": description}
    channel["messages"] = {name: {"$ref": f"#/components/messages/{name}"} for name in names}
    if parameters:
        channel["parameters"] = {name: {"$ref": f"#/components/parameters/{name}"} for name in parameters}
    return channel


def _send(channel: str, message: str, summary: str, description: str, reply: Doc | None = None) -> Doc:
    operation: Doc = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "description": description,
        "messages": _messages(channel, [message]),
    }
    if reply is not None:
        operation["reply"] = reply
    return operation


def _reply(channel: str, names: list[str], address: Doc | None = None) -> Doc:
    reply: Doc = {"channel": {"$ref": f"#/channels/{channel}"}, "messages": _messages(channel, names)}
    if address is not None:
        reply["address"] = address
    return reply


def _with_parameters(subject: str) -> str:
    return subject.replace(TOKEN, "{model_token}").replace(REQUEST, "{request_id}")


def bus_channels(s: Subjects) -> dict[str, Doc]:
    """The subjects clients send to, and the reply subjects they read."""
    group = DEFAULT_QUEUE_GROUP
    default = (
        f"Every worker (queue group `{group}`): the default model, or the model a request names in `model` (a "
        "worker forwards it to that model's subject)."
    )
    per_model = f"The workers of one model (queue group `{group}`)."
    jobs = f"Durable jobs in the JetStream work-queue stream `{JOBS_STREAM}` (subjects `{s.jobs}`), consumer"
    model_jobs = f"{jobs} `{group}-<model_token>`, which takes `{_with_parameters(s.model_jobs(TOKEN))}`."
    replies = list(dict.fromkeys(SINGLE + STREAM + BATCH + BATCH_STREAM))
    return {
        "chat": _channel(s.chat, "Chat", default, ["ChatRequest"]),
        "chatBatched": _channel(s.chat_batched, "Batch", default, ["BatchRequest"]),
        "modelChat": _channel(
            _with_parameters(s.model_chat(TOKEN)), "Chat, one model", per_model, ["ChatRequest"], "model_token"
        ),
        "modelChatBatched": _channel(
            _with_parameters(s.model_chat_batched(TOKEN)),
            "Batch, one model",
            per_model,
            ["BatchRequest"],
            "model_token",
        ),
        "cancel": _channel(
            _with_parameters(s.cancel(REQUEST)),
            "Cancel",
            f"Every worker subscribes to `{s.cancel_all}` (no queue group).",
            ["Cancel"],
            "request_id",
        ),
        "jobsChat": _channel(s.jobs_chat, "Chat job", f"{jobs} `{group}`.", ["ChatJob"]),
        "jobsChatBatched": _channel(s.jobs_chat_batched, "Batch job", f"{jobs} `{group}`.", ["BatchJob"]),
        "jobsModelChat": _channel(
            _with_parameters(s.model_jobs_chat(TOKEN)), "Chat job, one model", model_jobs, ["ChatJob"], "model_token"
        ),
        "jobsModelChatBatched": _channel(
            _with_parameters(s.model_jobs_chat_batched(TOKEN)),
            "Batch job, one model",
            model_jobs,
            ["BatchJob"],
            "model_token",
        ),
        "workerLeft": _channel(s.worker_left, "Worker left", "Every worker (no queue group).", ["WorkerLeft"]),
        "reply": _channel(None, "Reply subject", "A request's NATS reply subject (its inbox).", replies),
        "jobReply": _channel(
            None, "Job reply subject", "The subject a durable job names in `Llmbus-Reply-To`.", SINGLE + BATCH[:2]
        ),
    }


def bus_operations() -> dict[str, Doc]:
    operations: dict[str, Doc] = {}
    for channel, note in (("chat", ""), ("modelChat", f"{PER_MODEL}\n\n")):
        batched = f"{channel}Batched"
        operations |= {
            channel: _send(channel, "ChatRequest", "Chat: one answer", note + CHAT, _reply("reply", SINGLE)),
            f"{channel}Stream": _send(
                channel, "ChatRequest", "Chat: a stream", note + CHAT_STREAM, _reply("reply", STREAM)
            ),
            f"{channel}Batched": _send(
                batched, "BatchRequest", "Batch: one answer", note + BATCHED, _reply("reply", BATCH)
            ),
            f"{channel}BatchedStream": _send(
                batched, "BatchRequest", "Batch: a stream", note + BATCHED_STREAM, _reply("reply", BATCH_STREAM)
            ),
        }
    operations["cancel"] = _send("cancel", "Cancel", "Cancel a request", CANCEL)
    operations["workerLeft"] = {
        **_send("workerLeft", "WorkerLeft", "A worker left the bus", WORKER_LEFT),
        "action": "receive",
    }
    address = {"location": REPLY_TO_LOCATION, "description": "The job's `Llmbus-Reply-To` header."}
    for channel, message, answers, summary in (
        ("jobsChat", "ChatJob", SINGLE, "Chat job"),
        ("jobsChatBatched", "BatchJob", BATCH, "Batch job"),
        ("jobsModelChat", "ChatJob", SINGLE, "Chat job, one model"),
        ("jobsModelChatBatched", "BatchJob", BATCH, "Batch job, one model"),
    ):
        name = channel.replace("jobs", "job", 1)
        operations[name] = _send(channel, message, summary, JOB, _reply("jobReply", answers, address))
    return operations


def _discovery_scopes(verb: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(channel id suffix, address, who answers, parameters) of one verb: every service, llmbus's, one instance."""
    base = f"{DISCOVERY}.{verb}"
    return [
        ("", base, "every NATS micro service on the bus (llmbus workers among them)", ()),
        ("Service", f"{base}.{SERVICE_NAME}", "every llmbus worker", ()),
        ("Instance", f"{base}.{SERVICE_NAME}.{{service_id}}", "one llmbus worker", ("service_id",)),
    ]


def discovery() -> tuple[dict[str, Doc], dict[str, Doc]]:
    """The `$SRV` channels and operations: PING, INFO and STATS, each to every service, llmbus's, or one instance."""
    replies = {"PING": "PingResponse", "INFO": "InfoResponse", "STATS": "StatsResponse"}
    channels: dict[str, Doc] = {}
    operations: dict[str, Doc] = {}
    for verb, answer in replies.items():
        for suffix, address, who, parameters in _discovery_scopes(verb):
            channel = f"srv{verb.title()}{suffix}"
            title = f"{verb}: {who}"
            channels[channel] = _channel(address, title, f"Answered by {who}.", ["DiscoveryRequest"], *parameters)
            reply = _reply("discoveryReply", [answer])
            operations[f"{verb.lower()}{suffix}"] = _send(channel, "DiscoveryRequest", title, DISCOVERY_TEXT, reply)
    channels["discoveryReply"] = _channel(
        None, "Discovery reply subject", "A discovery request's reply subject.", list(replies.values())
    )
    return channels, operations
