"""A request forwarded to a model whose last worker died without a word is answered at once (`forward_probe`).

A worker forwards a request on `llm.chat` for another model to that model's subject with the client's reply subject.
When that model's last worker was killed (no departure on `llm.worker.left`), the routing view listed it for up to
`routing.TTL_S` more; a request forwarded meanwhile went to a subject nobody served, and nats-server dropped it: its
no-responders status goes only to the publisher, for a reply subject the publisher subscribes to. The client waited
out its whole timeout. Now the worker probes the subject first: the client gets a 503 `no_responders` naming the
model at once, and the next request for it takes a look at the bus (a 404 listing the models). A probe that reaches
a live worker is dropped unanswered and uncounted.

The workers' views never expire here (`NEVER_STALE`): a silent death is always inside the window. A worker dies by
losing its NATS connection without its `stop` (no departure), which the server sees as it sees a SIGKILL: the TCP
connection closes and its subscriptions go. Each client's own timeout is long (`CLIENT_TIMEOUT_S`); `PROMPT_S`
bounds the test's wait only to fail it instead of waiting that long.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from helpers.security_fixtures import SecureServer
from helpers.workers import model_worker
from inference_worker.routing import Forward
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.connection import connect, flushed
from llmbus.nats_server import NatsServer
from schemas import SERVICE_NAME, ChatRequest, Subjects
from schemas.subjects import ERROR, ERROR_CODE, ERROR_NAME, PROBE, REQUEST_ID, STREAM, STREAM_END

CLIENT_TIMEOUT_S = 60.0  # what a client waited for, before the fix
PROMPT_S = 10.0  # the test's failure detector: an answer this late is the old timeout, not a prompt error


def ask(chat_id: str, model: str, stream: bool = False) -> bytes:
    request = ChatRequest(chat_id=chat_id, user_prompt="hi", max_tokens=2, model=model, stream=stream)
    return msgspec.json.encode(request)


def plain(server: NatsServer) -> Config:
    return Config(nats_url=server.url, compile=False)


async def die_silently(dying: Worker, nc: NATS, subjects: Subjects | None = None) -> None:
    """`dying` loses its connection without a word (no drain, no departure), then the test waits until the server
    dropped its subscriptions: a message to its model's subject gets the no-responders status."""
    await dying.nc.close()
    subject = (subjects or Subjects()).model_chat(dying.model_name)
    while True:
        try:
            await nc.request(subject, b"", timeout=0.5)
        except nats.errors.NoRespondersError:
            return
        except nats.errors.TimeoutError:
            continue  # delivered to the closing connection before the server dropped it


async def knows_beta(alpha: Worker) -> None:
    assert await alpha.directory.route("beta") == Forward("beta")
    assert alpha.directory.known_route("beta") == Forward("beta")  # routed on the view held, without a look


def error_of(answer: Msg) -> tuple[dict[str, str], dict[str, Any]]:
    return answer.headers or {}, json.loads(answer.data)


def assert_beta_is_gone(answer: Msg) -> None:
    headers, body = error_of(answer)
    assert headers.get(ERROR_CODE) == "503" and headers.get(ERROR_NAME) == "no_responders", headers
    assert "`beta`" in headers[ERROR] and "`beta`" in body["error"] and body["code"] == 503


async def stats_of(nc: NATS, worker: Worker) -> dict[str, dict[str, Any]]:
    """`worker`'s `$SRV.STATS` answer, its endpoints by name."""
    reply = await nc.request(f"$SRV.STATS.{SERVICE_NAME}.{worker.service.id}", b"", timeout=PROMPT_S)
    return {e["name"]: e for e in json.loads(reply.data)["endpoints"]}


async def test_a_unary_request_for_a_model_killed_meanwhile_is_a_503_at_once_then_a_404(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """alpha's view lists beta; beta dies without a word. A request naming beta on llm.chat reaches alpha (the only
    worker left), which forwarded it to beta's empty subject before, where NATS dropped it. Now it is a 503 that
    names beta, at once; the next one, after alpha's look at the bus, the usual 404 listing the models."""
    config = plain(fresh_nats_server)
    async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
        await knows_beta(alpha)
        await asyncio.wait_for(die_silently(beta, fresh_nc), PROMPT_S * 3)
        answer = await asyncio.wait_for(fresh_nc.request("llm.chat", ask("lost", "beta"), CLIENT_TIMEOUT_S), PROMPT_S)
        assert_beta_is_gone(answer)
        assert alpha.directory.known_route("beta") is None  # forgotten: the next request looks at the bus first
        later = await asyncio.wait_for(fresh_nc.request("llm.chat", ask("later", "beta"), CLIENT_TIMEOUT_S), PROMPT_S)
    headers, body = error_of(later)
    assert headers.get(ERROR_CODE) == "404" and headers.get(ERROR_NAME) == "model_not_found", headers
    assert "`beta`" in body["error"] and "alpha" in body["error"]  # the models still on the bus


async def test_a_streamed_request_for_a_model_killed_meanwhile_ends_at_once_with_the_503(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """The stream's error is its end message (with its request id), then the sentinel, as for any stream refused
    before it ran."""
    config = plain(fresh_nats_server)
    async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
        await knows_beta(alpha)
        await asyncio.wait_for(die_silently(beta, fresh_nc), PROMPT_S * 3)
        inbox = fresh_nc.new_inbox()
        replies = await fresh_nc.subscribe(inbox)
        await fresh_nc.publish("llm.chat", ask("lost", "beta", stream=True), reply=inbox, headers={REQUEST_ID: "s-1"})
        end = await asyncio.wait_for(replies.next_msg(CLIENT_TIMEOUT_S), PROMPT_S)
        sentinel = await asyncio.wait_for(replies.next_msg(CLIENT_TIMEOUT_S), PROMPT_S)
    assert_beta_is_gone(end)
    assert (end.headers or {}).get(STREAM) == STREAM_END and (end.headers or {}).get(REQUEST_ID) == "s-1"
    assert sentinel.data == b"" and not sentinel.headers


async def test_a_request_for_a_live_model_is_still_forwarded_and_the_probe_is_not_counted(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """beta leaves llm.chat's queue group, so the request naming beta reaches alpha, which probes beta's subject
    and forwards it there: beta answers, and its statistics count the request alone, not the probe."""
    config = plain(fresh_nats_server)
    async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
        await knows_beta(alpha)
        on_llm_chat = next(e for e in beta.service.endpoints if e.name == "chat")
        await on_llm_chat.subscription.unsubscribe()  # type: ignore[union-attr]
        await flushed(beta.nc)
        answer = await asyncio.wait_for(fresh_nc.request("llm.chat", ask("live", "beta"), CLIENT_TIMEOUT_S), PROMPT_S)
        alpha_stats, beta_stats = await stats_of(fresh_nc, alpha), await stats_of(fresh_nc, beta)
        assert alpha.directory.known_route("beta") == Forward("beta")  # a live model is not forgotten
    assert json.loads(answer.data)["model"] == "beta"
    assert alpha_stats["chat"]["num_requests"] == 1  # alpha took it on llm.chat and forwarded it
    assert beta_stats["model_chat"]["num_requests"] == 1 and beta_stats["model_chat"]["num_errors"] == 0


async def test_a_probe_sent_by_hand_to_a_live_worker_gets_no_answer_and_is_not_counted(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """Probes on alpha's chat subjects, then a request on its model's subject: alpha handles them in order, and
    their answers come on one subscription in order, so the request's answer comes after any answer to a probe."""
    async with model_worker(plain(fresh_nats_server), "alpha") as alpha:
        inbox = fresh_nc.new_inbox()
        replies = await fresh_nc.subscribe(f"{inbox}.*")
        for subject in ("llm.model.alpha.chat", "llm.chat"):
            await fresh_nc.publish(subject, b"", reply=f"{inbox}.probe", headers={PROBE: "1"})
        await fresh_nc.publish("llm.model.alpha.chat", ask("real", "alpha"), reply=f"{inbox}.real")
        first = await asyncio.wait_for(replies.next_msg(CLIENT_TIMEOUT_S), PROMPT_S)
        stats = await stats_of(fresh_nc, alpha)
    assert first.subject == f"{inbox}.real", (first.subject, first.headers, first.data)
    assert json.loads(first.data)["model"] == "alpha"
    assert stats["model_chat"]["num_requests"] == 1 and stats["model_chat"]["num_errors"] == 0
    assert stats["chat"]["num_requests"] == 0 and stats["chat"]["num_errors"] == 0


async def test_the_worker_role_may_probe_a_model_killed_meanwhile(secure_bus: SecureServer) -> None:
    """Under the grants `llmbus nats-permissions --role worker` prints (TLS, a password login): the probe's publish
    to a model's subject and its subscription in the worker's own inbox are allowed, so a client gets the 503."""
    config = secure_bus.config("tiny-worker", subject_prefix="tiny", compile=False)
    subjects = Subjects("tiny")
    client = await connect(secure_bus.config("carol", subject_prefix="tiny"), "test-carol")
    try:
        async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
            await knows_beta(alpha)
            await asyncio.wait_for(die_silently(beta, client, subjects), PROMPT_S * 3)
            asked = client.request(subjects.chat, ask("lost", "beta"), CLIENT_TIMEOUT_S)
            assert_beta_is_gone(await asyncio.wait_for(asked, PROMPT_S))
    finally:
        await client.close()


async def test_a_batch_query_for_a_model_killed_meanwhile_is_a_404_at_once_not_retried_to_its_timeout(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    """A batch's coordinator sends each query to its model's subject with its own inbox (no probe needed), so it
    hears the no-responders status itself, and its `BusClient` turns it into a 404 after asking the bus which models
    are there, though the coordinator's view still lists the model: the query is not retried to its timeout, and the
    batch's other query is answered (`partial_success`)."""
    config = plain(fresh_nats_server)
    async with model_worker(config, "alpha") as alpha, model_worker(config, "beta") as beta:
        await knows_beta(alpha)
        await asyncio.wait_for(die_silently(beta, fresh_nc), PROMPT_S * 3)
        queries = [
            {"chat_id": "lost", "user_prompt": "hi", "max_tokens": 2, "model": "beta", "timeout": CLIENT_TIMEOUT_S},
            {"chat_id": "kept", "user_prompt": "hi", "max_tokens": 2, "model": "alpha"},
        ]
        batch = json.dumps({"queries": queries}).encode()
        answer = await asyncio.wait_for(fresh_nc.request("llm.chat.batched", batch, CLIENT_TIMEOUT_S), PROMPT_S)
    results = {r["chat_id"]: r for r in json.loads(answer.data)["responses"]}
    assert results["lost"]["code"] == 404 and "`beta`" in results["lost"]["error"], results["lost"]
    assert results["kept"].get("error") is None and results["kept"]["response"], results["kept"]
