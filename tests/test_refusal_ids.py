"""A streamed request refused before it runs ends with an error message that carries the `Llmbus-Request-Id` it sent
(when valid), as the AsyncAPI document and the README promise: a client matching messages by that header can place
it. Before, an unknown model on `llm.chat`, the wrong model on a model's subject and a bad tenant left it out."""

from __future__ import annotations

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from helpers.tiny_model import tiny_model
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatRequest
from schemas.subjects import ERROR_CODE, REQUEST_ID, STREAM, STREAM_END, TENANT


def streamed(model: str | None = None) -> bytes:
    return msgspec.json.encode(ChatRequest(chat_id="c", user_prompt="hi", max_tokens=2, model=model, stream=True))


@pytest.mark.parametrize(
    ("subject", "body", "extra", "code"),
    [
        ("llm.chat", streamed("nobody-serves-this"), {}, "404"),
        ("llm.model.tiny.chat", streamed("another-model"), {}, "400"),
        ("llm.model.tiny.chat", streamed(), {TENANT: "a b"}, "400"),
        ("llm.chat", streamed(), {TENANT: "a b"}, "400"),
    ],
    ids=["unknown model", "wrong model on a model subject", "bad tenant on a model subject", "bad tenant"],
)
async def test_a_refused_stream_ends_with_its_request_id(
    fresh_nats_server: NatsServer, fresh_nc: NATS, subject: str, body: bytes, extra: dict[str, str], code: str
) -> None:
    config = Config(nats_url=fresh_nats_server.url, served_model_name="tiny", default_model=True, compile=False)
    worker = Worker(config, await nats.connect(fresh_nats_server.url), tiny_model())
    await worker.start()
    try:
        inbox = fresh_nc.new_inbox()
        sub = await fresh_nc.subscribe(inbox)
        await fresh_nc.publish(subject, body, reply=inbox, headers={REQUEST_ID: "r1", **extra})
        end = await sub.next_msg(timeout=60)
        sentinel = await sub.next_msg(timeout=60)
    finally:
        await worker.close()
        await worker.nc.close()
    assert (end.headers[ERROR_CODE], end.headers[STREAM], end.headers.get(REQUEST_ID)) == (code, STREAM_END, "r1")
    assert sentinel.data == b"" and not sentinel.headers
