"""schemathesis against the bridge's own `/openapi.json`: every operation gets generated (valid and invalid) requests.
No case may get a server error (5xx) except a 504 that the request's own short `timeout` asked for; the bridge and the
worker stay up, and a canary chat running meanwhile is answered every time."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from helpers.bridge import Bridge, start_bridge
from helpers.faults import FaultFigures
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.config import Config
from llmbus.nats_server import NatsServer

schemathesis = pytest.importorskip("schemathesis")

PREFIX = "fh"
EXAMPLES_PER_OPERATION = 25
CALL_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
async def http_worker(nats_server: NatsServer, smollm: LoadedModel) -> AsyncIterator[RunningWorker]:
    config = Config(
        nats_url=nats_server.url,
        subject_prefix=PREFIX,
        queue_group="fuzz-http-workers",
        max_tokens_cap=4,
        max_batch_queries=8,
        max_seq_len=256,
    )
    running = await start_worker(config, smollm)
    yield running
    await running.shutdown()


@pytest.fixture(scope="module")
async def fuzz_bridge(nats_server: NatsServer, http_worker: RunningWorker) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(Config(nats_url=nats_server.url, subject_prefix=PREFIX, request_timeout=60.0))
    yield bridge
    await bridge.shutdown()


def short_timeout_asked(body: Any) -> bool:
    """A request may ask for a deadline so short that 504 is the right answer: `timeout` is user input too."""
    if isinstance(body, dict):
        value = body.get("timeout")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 5:
            return True
        return any(short_timeout_asked(v) for v in body.values())
    if isinstance(body, list):
        return any(short_timeout_asked(v) for v in body)
    return False


class Canary:
    """A well-behaved HTTP client asking a normal question throughout the fuzzing."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.answers = 0
        self.wrong: list[object] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    async def _loop(self) -> None:
        body = {"chat_id": "canary", "user_prompt": "Name a colour.", "max_tokens": 4}
        while not self._stop.is_set():
            response = await self.http.post("/chat", json=body)
            answer = response.json() if response.status_code == 200 else None
            if answer is None or answer.get("chat_id") != "canary" or not answer.get("response"):
                self.wrong.append((response.status_code, response.text[:200]))
            else:
                self.answers += 1
            await asyncio.sleep(0.2)  # a steady trickle, not a flood


def fuzz_operations(base_url: str, tally: Counter[str]) -> list[str]:
    """Run in a thread (schemathesis calls are blocking): every operation of the bridge's schema, generated cases."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        fuzz_operation(result.ok(), base_url, tally, failures)
    return failures


def fuzz_operation(operation: Any, base_url: str, tally: Counter[str], failures: list[str]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def one_case(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=CALL_TIMEOUT_S)
        status = response.status_code
        tally[f"{label}: {status}"] += 1
        if status >= 500 and not (status == 504 and short_timeout_asked(case.body)):
            failures.append(f"{label} -> {status}: {response.text[:300]} <- {json.dumps(case.body, default=str)[:300]}")

    one_case()


@pytest.mark.model
async def test_the_bridge_answers_generated_requests_without_server_errors(fuzz_bridge: Bridge) -> None:
    tally: Counter[str] = Counter()
    async with fuzz_bridge.client() as http:
        canary = Canary(http)
        canary.start()
        try:
            failures = await asyncio.to_thread(fuzz_operations, fuzz_bridge.url, tally)
        finally:
            await canary.stop()
        assert not failures, failures
        assert canary.answers >= 1 and not canary.wrong, canary.wrong
        assert (await http.get("/healthz")).status_code == 200, "the bridge must still be up"
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] >= 1, ready.text
    FaultFigures(
        "fuzz_http_openapi",
        sent=sum(tally.values()),
        answered=sum(n for label, n in tally.items() if label.endswith(("200", "201"))),
        errored=sum(n for label, n in tally.items() if not label.endswith(("200", "201"))),
        notes={"by_operation_and_status": dict(sorted(tally.items())), "canary_answers": canary.answers},
    ).record()
