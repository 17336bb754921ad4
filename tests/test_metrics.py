"""Worker metrics on a tiny random model: a real worker on a real nats-server, scraped over HTTP, against what its
clients saw; the engine's step figures; the same figures in `$SRV.STATS`; bounded labels."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from bus_gateway.metrics import BridgeMetrics
from helpers.scrape import Scrape, compile_states, scrape
from helpers.tiny_model import tiny_model
from helpers.workers import start_worker
from inference_worker.engine import EngineConfig, LLMEngine
from inference_worker.metrics import WorkerMetrics, kv_cache_usage
from inference_worker.metrics_summary import bucket_quantile
from inference_worker.model_loader import LoadedModel
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence
from llmbus.config import Config
from llmbus.nats_server import NatsServer, free_port, port_is_free
from llmbus.stack import with_metrics_port
from schemas import ChatRequest, Subjects

HISTOGRAMS_PER_REQUEST = (
    "llmbus_time_to_first_token_seconds",
    "llmbus_e2e_request_latency_seconds",
    "llmbus_request_queue_time_seconds",
)
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-llmbus.json"
ALLOWED_LABELS = {"model", "worker", "finished_reason", "code", "le", "state"}
prefixes = (f"metrics{n}" for n in itertools.count())


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


class Metered:
    def __init__(self, bus: BusClient, url: str) -> None:
        self.bus = bus
        self.url = url

    async def scrape(self) -> Scrape:
        return await scrape(self.url)

    async def stats_data(self) -> dict:
        """This worker's `$SRV.STATS` data (other tests' workers answer on the same server)."""
        replies = await self.bus.stats(2.0)
        (mine,) = [r for r in replies if r["endpoints"][0]["subject"] == self.bus.subjects.chat]
        return mine["endpoints"][0]["data"]


@pytest.fixture
async def metered(nats_server: NatsServer, tiny: LoadedModel) -> AsyncIterator[Metered]:
    """A fresh tiny-model worker with its metrics on a free port, on subjects of its own."""
    prefix, port = next(prefixes), free_port()
    config = Config(nats_url=nats_server.url, subject_prefix=prefix, metrics_port=port, max_tokens_cap=64)
    worker = await start_worker(config, tiny)
    bus = await BusClient.connect(nats_server.url, subjects=Subjects(prefix))
    try:
        yield Metered(bus, f"http://127.0.0.1:{port}/metrics")
    finally:
        await bus.close()
        await worker.shutdown()


async def ask(bus: BusClient, n: int, max_tokens: int, stream: bool) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) as the client saw them."""
    request = ChatRequest(chat_id=f"c{n}", user_prompt=f"question number {n} " * (n + 1), max_tokens=max_tokens)
    if not stream:
        usage = (await bus.chat(request, request_id=f"private-id-{n}")).usage
        return usage.prompt_tokens, usage.completion_tokens
    async for chunk in bus.stream(request, request_id=f"private-id-{n}"):
        if chunk.done:
            return chunk.usage.prompt_tokens, chunk.usage.completion_tokens
    raise AssertionError("the stream ended without its done chunk")


async def test_counters_agree_with_what_the_clients_saw(metered: Metered) -> None:
    shapes = [(3, False), (5, True), (7, False), (4, True), (9, False), (6, False)]
    first = await ask(metered.bus, 0, *shapes[0])  # alone: its system prompt is then in the prefix cache
    rest = await asyncio.gather(*(ask(metered.bus, n, *shape) for n, shape in enumerate(shapes[1:], start=1)))
    seen = [first, *rest]
    m = await metered.scrape()
    n = len(shapes)
    for histogram in HISTOGRAMS_PER_REQUEST:
        assert m.value(histogram + "_count") == n, histogram
    completions = [completion for _, completion in seen]
    assert completions == [tokens for tokens, _ in shapes]  # the tiny model never stops early
    assert m.value("llmbus_generation_tokens_total") == sum(completions)
    assert m.value("llmbus_prompt_tokens_total") == sum(prompt for prompt, _ in seen)
    assert m.value("llmbus_request_success_total", finished_reason="length") == n
    # every token after a request's first comes from a decode step: one gap and one row each
    assert m.value("llmbus_inter_token_latency_seconds_count") == sum(c - 1 for c in completions)
    assert m.value("llmbus_decode_batch_size_sum") == sum(c - 1 for c in completions)
    assert m.value("llmbus_num_requests_running") == 0 and m.value("llmbus_num_requests_waiting") == 0
    assert m.value("llmbus_kv_cache_usage_perc") == 0
    assert m.value("llmbus_prefix_cache_queries_total") >= m.value("llmbus_prompt_tokens_total")
    assert 0 < m.value("llmbus_prefix_cache_hit_tokens_total") < m.value("llmbus_prefix_cache_queries_total")


async def test_stats_data_carries_the_same_figures(metered: Metered) -> None:
    await asyncio.gather(*(ask(metered.bus, n, 4, n % 2 == 0) for n in range(3)))
    m = await metered.scrape()
    data = await metered.stats_data()
    for key in ("draining", "threads", "errors_by_code", "pending", "batches", "running", "waiting", "decode_steps"):
        assert key in data, key
    figures = data["metrics"]
    assert figures["generation_tokens_total"] == m.value("llmbus_generation_tokens_total") == 12
    assert figures["prompt_tokens_total"] == m.value("llmbus_prompt_tokens_total")
    assert figures["request_success_total"] == {"length": 3}
    assert figures["time_to_first_token_seconds"]["count"] == 3
    assert (
        figures["decode_step_seconds"]["count"] == m.value("llmbus_decode_step_seconds_count") == data["decode_steps"]
    )
    assert figures["prefill_step_seconds"]["count"] == data["prefill_forwards"]
    assert data["decode_seconds"] == pytest.approx(figures["decode_step_seconds"]["sum"], abs=1e-5)
    assert data["prefill_seconds"] == pytest.approx(figures["prefill_step_seconds"]["sum"], abs=1e-5)
    ttft = figures["time_to_first_token_seconds"]
    assert 0 < ttft["p50"] <= ttft["p99"] and ttft["mean"] == pytest.approx(ttft["sum"] / 3, abs=1e-5)


async def test_failures_count_every_error_answer_by_code(metered: Metered) -> None:
    nc = metered.bus.nc
    subject = metered.bus.subjects.chat
    await nc.request(subject, b"{not json", timeout=30)
    with pytest.raises(BusError) as too_many:
        await metered.bus.chat(ChatRequest(chat_id="x", user_prompt="hi", max_tokens=65))  # over max_tokens_cap 64
    assert too_many.value.code == 400
    m = await metered.scrape()
    assert m.value("llmbus_request_failure_total", code="400") == 2
    assert m.value("llmbus_request_failure_total") == 2
    data = await metered.stats_data()
    assert data["errors_by_code"] == {"400": 2} and data["metrics"]["request_failure_total"] == {"400": 2}


async def test_labels_are_model_and_worker_only(metered: Metered) -> None:
    await asyncio.gather(ask(metered.bus, 1, 3, False), ask(metered.bus, 2, 3, True))
    m = await metered.scrape()
    assert m.llmbus(), "no llmbus_ metrics"
    for name, labels, _ in m.llmbus():
        assert set(labels) <= ALLOWED_LABELS, (name, labels)
        assert labels["model"] == "tiny" and labels["worker"] == f"{socket.gethostname()}:{os.getpid()}", name
    assert "private-id" not in m.text and "question number" not in m.text


def test_engine_steps_feed_the_step_histograms(tiny: LoadedModel) -> None:
    metrics = WorkerMetrics("tiny", "w")
    engine = LLMEngine(tiny, EngineConfig(max_batch_size=4), observer=metrics)
    prompts = [tiny.encode_chat([{"role": "user", "content": text}]) for text in ("one", "two two", "three three")]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 6, 8)]
    engine.generate(prompts, params)
    figures = metrics.summary()
    assert figures["decode_step_seconds"]["count"] == engine.stats.decode_steps
    assert figures["prefill_step_seconds"]["count"] == engine.stats.prefill_forwards
    assert figures["decode_batch_size"]["sum"] == (4 + 6 + 8) - 3
    assert figures["inter_token_latency_seconds"]["count"] == (4 + 6 + 8) - 3
    assert figures["decode_batch_size"]["count"] == engine.stats.decode_steps
    # the stats' busy seconds are the same step times the histograms sum
    assert engine.stats.decode_seconds == pytest.approx(figures["decode_step_seconds"]["sum"], abs=1e-5)
    assert engine.stats.prefill_seconds == pytest.approx(figures["prefill_step_seconds"]["sum"], abs=1e-5)
    assert engine.stats.decode_seconds > 0 and engine.stats.prefill_seconds > 0


def test_the_compile_state_is_one_series_per_state_with_the_current_one_at_1(tiny: LoadedModel) -> None:
    """An engine without compile: `off` (a failed compiled step shows as `failed`: test_engine_compiled.py)."""
    worker = WorkerMetrics("m", "w")
    worker.watch(LLMEngine(tiny, EngineConfig(max_batch_size=2, max_seq_len=64)))
    assert compile_states(worker.registry) == {"off": 1.0, "compiling": 0.0, "ready": 0.0, "failed": 0.0}


def test_kv_cache_usage_is_the_share_of_slots_times_window_held(tiny: LoadedModel) -> None:
    engine = LLMEngine(tiny, EngineConfig(max_batch_size=4, max_seq_len=64))
    for name, text in (("a", "hello"), ("b", "hello there, engine")):
        ids = tiny.encode_chat([{"role": "user", "content": text}])
        engine.add_request(Sequence(name, ids, SamplingParams(max_tokens=3, ignore_eos=True)))
    assert kv_cache_usage(engine) == 0
    engine.prefill()
    held = sum(seq.num_cached_tokens for seq in engine.scheduler.running)
    assert held > 0 and kv_cache_usage(engine) == pytest.approx(held / (4 * 64))
    while engine.has_work():
        engine.step()
    assert kv_cache_usage(engine) == 0

    two_rows = LLMEngine(tiny, EngineConfig(max_batch_size=4, max_seq_len=64, kv_cache_tokens=128, prefix_cache=False))
    assert two_rows.plan.rows == 2  # the KV budget buys two rows of the four asked for: those are the capacity
    two_rows.add_request(Sequence("c", tiny.encode_chat([{"role": "user", "content": "hi"}]), SamplingParams()))
    two_rows.prefill()
    held = sum(seq.num_cached_tokens for seq in two_rows.scheduler.running)
    assert kv_cache_usage(two_rows) == pytest.approx(held / (2 * 64))


def test_bucket_quantiles_follow_prometheus_histogram_quantile() -> None:
    inf = float("inf")
    assert bucket_quantile(0.5, [(1.0, 0), (inf, 0)]) is None
    assert bucket_quantile(0.5, [(1.0, 2), (2.0, 4), (inf, 4)]) == 1.0
    assert bucket_quantile(0.75, [(1.0, 2), (2.0, 4), (inf, 4)]) == 1.5
    assert bucket_quantile(0.99, [(1.0, 1), (inf, 2)]) == 1.0  # in the +Inf bucket: its lower bound


def test_metrics_port_settings() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        Config(metrics_port=70000)
    assert with_metrics_port(Config(), None).metrics_port is None  # `llmbus worker`: off unless asked
    assert with_metrics_port(Config(metrics_port=0), 9464).metrics_port == 0  # explicitly off stays off
    assert with_metrics_port(Config(metrics_port=1234), 9464).metrics_port == 1234
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        chosen = with_metrics_port(Config(), busy).metrics_port  # `llmbus up` with its default port taken
        assert chosen not in (None, 0, busy)
        with pytest.raises(OSError, match=f"metrics port {busy} on 127.0.0.1 is not available.*--metrics-port"):
            WorkerMetrics("m", "w").serve("127.0.0.1", busy)


def exposed_names(registry: CollectorRegistry) -> set[str]:
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes.get(family.type, ("",))}


def test_the_grafana_dashboard_queries_only_metrics_that_exist(tiny: LoadedModel) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    assert all(panel["targets"] for panel in panels) and len(panels) >= 12
    worker = WorkerMetrics("m", "w")
    worker.watch(LLMEngine(tiny, EngineConfig(max_batch_size=2, max_seq_len=64)))
    exposed = exposed_names(worker.registry) | exposed_names(BridgeMetrics().registry)
    used = {name for expr in exprs for name in re.findall(r"llmbus_\w+", expr)}
    assert used <= exposed, used - exposed
    family = re.compile(r"_(bucket|sum|count|total)$")
    never_shown = {family.sub("", n) for n in exposed if n.startswith("llmbus_")} - {family.sub("", n) for n in used}
    assert not never_shown, f"metrics with no panel: {never_shown}"


async def test_a_closed_worker_stops_serving_its_metrics(nats_server: NatsServer, tiny: LoadedModel) -> None:
    """An in-process worker (tests, an embedding service) closed and started again gets its port back."""
    port = free_port()
    config = Config(nats_url=nats_server.url, subject_prefix=next(prefixes), metrics_port=port, max_tokens_cap=8)
    worker = await start_worker(config, tiny)
    assert (await scrape(f"http://127.0.0.1:{port}/metrics")).llmbus()
    await worker.shutdown()
    assert port_is_free(port)
    again = await start_worker(config, tiny)  # the same port: it raised OSError while the first one held it
    await again.shutdown()
