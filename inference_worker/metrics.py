"""Worker metrics, in vLLM's names and style with the prefix `llmbus_`, labelled `model` and `worker` only.

Three sources, each recorded once:
- live figures, read from the engine at each scrape: requests running and waiting, KV-cache usage, prefix-cache
  hit and queried tokens (`EngineFigures`);
- each engine step (`StepObserver`, called from the engine thread): prefill and decode step time, decode batch size,
  and the inter-token gaps of the rows that got a token;
- each request, at its final answer (`answered`): prompt and generation tokens, success by finish reason, time to
  first token, end-to-end, queue time. Times count from when the worker received the message. The same call
  writes the request's log line and its spans. Failures by code count every error answer published (`failed`); a
  request refused before the engine held it gets its log line and span too (`refused`). A durable job put back on
  its queue, or an answer whose publish failed, is no answer: it counts in `unanswered` by outcome only, a figure of
  `$SRV.STATS` (`request_unanswered_total`), not of the Prometheus endpoint.

`summary()` gives the same figures for `$SRV.STATS` data (`metrics_summary`), so `nats micro stats` shows them;
`serve()` exposes them in the Prometheus text format on their own port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from threading import Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from inference_worker.events import Failed, Finished, Timings
from inference_worker.held import Held
from inference_worker.metrics_summary import registry_summary
from llmbus import logs, tracing
from schemas.errors import ERRORS

if TYPE_CHECKING:
    from inference_worker.engine import LLMEngine

PREFIX = "llmbus_"
LABELS = ("model", "worker")
KNOWN_CODES = frozenset(str(spec.code) for spec in ERRORS.values())
# vLLM's buckets for the request histograms; steps and batches in between
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)  # fmt: skip
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
COMPILE_STATES = ("off", "compiling", "ready", "failed")
UNANSWERED = ("requeued", "redelivered", "abandoned")  # `held.Outcome`s that leave a request to another worker, or none


def kv_cache_usage(engine: LLMEngine) -> float:
    """The share of the KV cache's token capacity (slots x context window) that the running sequences hold: the
    slot cache grows up to a whole context window per slot, so 1 means the batch's memory is full. The slots are
    the memory plan's rows, fewer than `max_batch_size` when `kv_cache_tokens` or the memory buys fewer."""
    capacity = engine.plan.rows * engine.max_seq_len
    held = sum(seq.num_cached_tokens for seq in tuple(engine.scheduler.running))
    return min(1.0, held / capacity) if capacity else 0.0


class EngineFigures:
    """A Prometheus collector of the engine's live figures, read when scraped."""

    def __init__(self, engine: LLMEngine, labels: dict[str, str]) -> None:
        self.engine = engine
        self.labels = labels

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        snapshot = self.engine.snapshot()
        snapshot["kv_cache_usage"] = kv_cache_usage(self.engine)
        return self._families(snapshot)

    def _families(self, figures: dict[str, Any]) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        for kind, name, doc, key in (
            (GaugeMetricFamily, "num_requests_running", "Requests in the running batch.", "running"),
            (GaugeMetricFamily, "num_requests_waiting", "Requests waiting for a batch slot.", "waiting"),
            (GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage: 1 means full.", "kv_cache_usage"),
            (CounterMetricFamily, "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
             "prefix_tokens_reused"),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             "prompt_tokens"),
        ):  # fmt: skip
            family = kind(PREFIX + name, doc, labels=names)
            if figures:
                family.add_metric(values, figures[key])
            yield family
        yield self._compile_state(names, values, figures.get("compile"))

    def _compile_state(self, names: list[str], values: list[str], current: str | None) -> GaugeMetricFamily:
        """1 for the decode step's state, 0 for the others (the state-as-label convention): `failed` means the
        compiled step broke and the worker decodes eagerly, several times slower on a GPU; worth an alert."""
        family = GaugeMetricFamily(
            PREFIX + "decode_compile_state",
            "The decode step's compile state (off, compiling, ready, failed), one series per state.",
            labels=[*names, "state"],
        )
        if current is not None:
            for state in COMPILE_STATES:
                family.add_metric([*values, state], float(state == current))
        return family


class WorkerMetrics:
    """One worker's metrics in its own registry. Implements the engine's `StepObserver`."""

    def __init__(self, model: str, worker: str, *, log_prompts: bool = False) -> None:
        self.model = model
        self.log_prompts = log_prompts
        self.labels = {"model": model, "worker": worker}
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of the requests answered.")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated for the requests answered.")
        self._success = Counter(
            PREFIX + "request_success", "Requests answered, by finish reason.", [*LABELS, "finished_reason"],
            registry=self.registry,
        )  # fmt: skip
        self._failure = Counter(
            PREFIX + "request_failure", "Error answers, by code.", [*LABELS, "code"], registry=self.registry
        )
        self.unanswered_by_outcome = dict.fromkeys(UNANSWERED, 0)  # `unanswered`, for `summary` only
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Time between two tokens of a request.", ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Time from arrival to final answer.", E2E_BUCKETS)
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Time from arrival to first prefill.", TTFT_BUCKETS
        )
        self.prefill_time = self._histogram("prefill_step_seconds", "Time of one prefill forward.", STEP_BUCKETS)
        self.decode_time = self._histogram("decode_step_seconds", "Time of one decode step.", STEP_BUCKETS)
        self.decode_batch = self._histogram("decode_batch_size", "Rows decoded together in one step.", BATCH_BUCKETS)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def _counter(self, name: str, doc: str) -> Any:
        return Counter(PREFIX + name, doc, LABELS, registry=self.registry).labels(**self.labels)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Any:
        return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=self.registry).labels(**self.labels)

    def watch(self, engine: LLMEngine) -> None:
        """Expose the engine's live figures (once it is built)."""
        self.registry.register(EngineFigures(engine, self.labels))

    # --- the engine's StepObserver (engine thread) ---------------------------------------------------------

    def prefill_step(self, seconds: float, rows: int, tokens: int) -> None:
        self.prefill_time.observe(seconds)

    def decode_step(self, seconds: float, rows: int) -> None:
        self.decode_time.observe(seconds)
        self.decode_batch.observe(rows)

    def token_gaps(self, gaps: list[float]) -> None:
        for gap in gaps:
            self.itl.observe(gap)

    # --- answers (event loop) ---------------------------------------------------------------------------------

    def failed(self, code: int) -> None:
        """One error answer published (any: refused, invalid, failed in the engine)."""
        label = str(code) if str(code) in KNOWN_CODES else "other"
        self._failure.labels(**self.labels, code=label).inc()

    def unanswered(self, outcome: str) -> None:
        """A request this worker let go without an answer (`UNANSWERED`): a durable job requeued or redelivered (the
        worker that takes it next answers it) or an answer abandoned (its publish failed). No figures, log line or
        span of its own."""
        self.unanswered_by_outcome[outcome if outcome in UNANSWERED else "abandoned"] += 1

    def answered(self, held: Held, event: Finished | Failed, now: float | None = None) -> None:
        """A held request got its final answer: its figures, its log line, and its spans."""
        now = time.monotonic() if now is None else now
        timings, arrived = event.timings, held.received
        if isinstance(event, Finished):
            self._success.labels(**self.labels, finished_reason=event.finish_reason).inc()
            self.prompt_tokens.inc(event.prompt_tokens)
            self.generation_tokens.inc(event.completion_tokens)
        if timings.scheduled_at is not None:
            self.queue_time.observe(max(0.0, timings.scheduled_at - arrived))
        if timings.first_token_at is not None:
            self.ttft.observe(max(0.0, timings.first_token_at - arrived))
        self.e2e.observe(max(0.0, now - arrived))
        finished = isinstance(event, Finished)
        line = logs.RequestLine(
            request_id=held.request_id,
            model=self.model,
            prompt_tokens=event.prompt_tokens if finished else None,
            completion_tokens=event.completion_tokens if finished else None,
            ttft_s=None if timings.first_token_at is None else timings.first_token_at - arrived,
            total_s=now - arrived,
            finish_reason=event.finish_reason if finished else None,
            code=200 if finished else event.code,
            trace_id=tracing.trace_id_of(held.replier.headers),
        )
        logs.request_finished(line)
        if self.log_prompts and finished:
            logs.completion(held.request_id, event.text)
        tracing.request_spans(held.replier.headers, *request_phases(arrived, timings, now), line.span_attributes())

    def refused(
        self, headers: dict[str, str] | None, request_id: str, code: int, received: float, now: float | None = None
    ) -> None:
        """A request answered `code` before the engine held it: its log line and its span (the request, from when
        the message arrived to its answer), as an answered request's but without tokens or phases. Its code is
        counted by `failed`; the latency histograms are for the requests the engine held."""
        now = time.monotonic() if now is None else now
        total, trace_id = max(0.0, now - received), tracing.trace_id_of(headers)
        line = logs.RequestLine(request_id, self.model, None, None, None, total, None, code, trace_id)
        logs.request_finished(line)
        tracing.request_spans(headers, tracing.Phase("worker request", received, now), [], line.span_attributes())

    # --- exposition ---------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The `llmbus_` figures for `$SRV.STATS` data, named without the prefix (`registry_summary`), after the
        requests let go unanswered, by outcome (`unanswered`)."""
        unanswered = {k: n for k, n in self.unanswered_by_outcome.items() if n}
        return {"request_unanswered_total": unanswered, **registry_summary(self.registry, PREFIX)}

    def serve(self, host: str, port: int) -> str:
        """Serve the Prometheus text format at http://host:port/metrics, from a thread; returns the URL."""
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics port {port} on {host} is not available ({exc.strerror}): pick another with "
                "--metrics-port (0 turns the metrics endpoint off)"
            ) from None  # fmt: skip
        bound = self._server.server_address[1]
        return f"http://{host}:{bound}/metrics"

    def stop_serving(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def request_phases(arrived: float, timings: Timings, answered: float) -> tuple[tracing.Phase, list[tracing.Phase]]:
    """The request's span and its parts: queue wait, prefill, decode (to the last token), reply (to the answer)."""
    return tracing.Phase("worker request", arrived, answered), [
        tracing.Phase("queue wait", arrived, timings.scheduled_at),
        tracing.Phase("prefill", timings.scheduled_at, timings.first_token_at),
        tracing.Phase("decode", timings.first_token_at, timings.finished_at),
        tracing.Phase("reply", timings.finished_at, answered),
    ]
