"""A cancel that every worker remembers for a minute (its request may come after it: they travel on different
subscriptions), and a client that re-sends a cancelled request with the same id (a retry after a timeout, whose
cancel BusClient sent itself): the request does not run, and the answer is an error that says why."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.client import Client as NATS

from bus_gateway.client import BusClient, BusError
from helpers.tiny_model import tiny_model
from inference_worker.worker import Worker
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatRequest


async def cancelled_key_remembered(worker: Worker, key: tuple[str, str]) -> None:
    """Until the worker's cancel handler has run for `key` (the cancel arrives on a subscription of its own). Read
    without `was_cancelled`, which forgets the key it finds."""
    while key not in worker.held._tombstones:
        await asyncio.sleep(0.01)


async def test_a_request_sent_again_with_a_cancelled_id_is_a_499_that_says_to_use_a_new_id(
    fresh_nats_server: NatsServer, fresh_nc: NATS
) -> None:
    config = Config(nats_url=fresh_nats_server.url, max_tokens_cap=8, threads=1, compile=False)
    worker = Worker(config, await nats.connect(fresh_nats_server.url), tiny_model())
    await worker.start()
    client = BusClient(fresh_nc)
    try:
        await client.cancel("job-42")  # the cancel of an earlier try, which this worker never held
        key = (client.inbox.reply_subject("job-42"), "job-42")
        await asyncio.wait_for(cancelled_key_remembered(worker, key), 30)
        with pytest.raises(BusError) as refused:
            await client.chat(ChatRequest(chat_id="again", user_prompt="hi", max_tokens=2), request_id="job-42")
        fresh = await client.chat(ChatRequest(chat_id="new", user_prompt="hi", max_tokens=2), request_id="job-43")
    finally:
        await worker.close()
        await worker.nc.close()
    assert refused.value.code == 499 and refused.value.name == "cancelled"
    assert "'job-42' was cancelled in the last 60 s" in refused.value.message and "new request id" in str(refused.value)
    assert fresh.chat_id == "new"
