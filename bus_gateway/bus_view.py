"""The bus at a glance: one row per worker (`worker_rows`) and the bus totals, from `$SRV.INFO` and `$SRV.STATS`
replies.

The functions here are pure: replies in (as `BusClient.info()` / `.stats()` return them), view out; partial or odd
replies read as `worker_rows` reads them, and a figure no worker gave is None, never 0. With `subject_prefix`, only
the workers on that prefix count, as in `BusModels.of` (one that does not say counts). Tokens/s needs two samples of
each worker's `tokens_generated`; `BusSampler` keeps the previous samples and is the only stateful part:

    sampler = BusSampler()
    view = sampler.observe(await bus.info(), await bus.stats())   # tokens_per_s None on the first call
    view = sampler.observe(await bus.info(), await bus.stats())   # tokens/s over the interval since then
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

from bus_gateway.discovery import on_prefix
from bus_gateway.worker_rows import Reply, WorkerRow, worker_rows

Number = TypeVar("Number", int, float)
MIN_RATE_INTERVAL = 1.0  # seconds: tokens/s is measured over at least this long when samples allow it


class BusTotals(msgspec.Struct, kw_only=True):
    """The sums over the workers that answered STATS (`stats_answers` of them); a figure no worker gave is None,
    `draining` and `compile_failed` included (no STATS answer: unknown, never 0). `other_prefixes`: the subject
    prefixes of workers left out of the view (another bus on the same server)."""

    workers: int = 0
    stats_answers: int = 0
    draining: int | None = None
    compile_failed: int | None = None
    models: list[str] = []
    running: int | None = None
    waiting: int | None = None
    tokens_per_s: float | None = None
    requests: int | None = None
    errors: int | None = None
    cancelled: int | None = None
    other_prefixes: list[str] = []


class BusView(msgspec.Struct, kw_only=True):
    """Rows sorted by host, pid and id. `interval_s` is the span tokens/s was measured over (None: one sample)."""

    time: str
    interval_s: float | None
    workers: list[WorkerRow]
    totals: BusTotals


class Sample(msgspec.Struct, frozen=True):
    """Each worker's `tokens_generated` at monotonic time `at`."""

    at: float
    tokens: dict[str, int]


def with_rates(rows: Sequence[WorkerRow], previous: Sample | None, at: float) -> list[WorkerRow]:
    """The rows with `tokens_per_s` over the interval since `previous` (None for workers it lacks, a worker without
    a STATS answer, a counter that went backwards, or no time passed)."""
    if previous is None or at <= previous.at:
        return list(rows)
    elapsed = at - previous.at
    out = []
    for row in rows:
        before, now = previous.tokens.get(row.id), row.tokens_generated
        rate = None if before is None or now is None or now < before else (now - before) / elapsed
        out.append(msgspec.structs.replace(row, tokens_per_s=rate))
    return out


def sample_of(rows: Iterable[WorkerRow], at: float) -> Sample:
    return Sample(at=at, tokens={row.id: row.tokens_generated for row in rows if row.tokens_generated is not None})


def known_sum(values: Iterable[Number | None]) -> Number | None:
    """The sum of the known values; None when none is known (never an invented 0)."""
    known = [value for value in values if value is not None]
    return sum(known[1:], known[0]) if known else None


def known_count(flags: Iterable[bool | None]) -> int | None:
    """How many of the known flags are set; None when none is known (a worker without a STATS answer)."""
    known = [flag for flag in flags if flag is not None]
    return sum(known) if known else None


def bus_totals(rows: Sequence[WorkerRow], other_prefixes: Iterable[str] = ()) -> BusTotals:
    return BusTotals(
        workers=len(rows),
        stats_answers=sum(row.stats for row in rows),
        draining=known_count(row.draining if row.stats else None for row in rows),
        compile_failed=known_count(row.compile == "failed" if row.stats else None for row in rows),
        models=sorted({row.model for row in rows if row.model}),
        running=known_sum(row.running for row in rows),
        waiting=known_sum(row.waiting for row in rows),
        tokens_per_s=known_sum(row.tokens_per_s for row in rows),
        requests=known_sum(row.requests for row in rows),
        errors=known_sum(row.errors for row in rows),
        cancelled=known_sum(row.cancelled for row in rows),
        other_prefixes=sorted(set(other_prefixes)),
    )


def bus_view(
    infos: Iterable[Reply],
    stats: Iterable[Reply],
    now: datetime,
    at: float,
    previous: Sample | None,
    subject_prefix: str | None = None,
) -> tuple[BusView, Sample]:
    """The view at wall time `now` and monotonic time `at`, with rates since `previous`; and this sample. With
    `subject_prefix`, the workers of other prefixes are left out (their prefixes listed in the totals)."""
    every = worker_rows(infos, stats, now)
    rows = [row for row in every if on_prefix(row.subject_prefix, subject_prefix)]
    others = [row.subject_prefix for row in every if not on_prefix(row.subject_prefix, subject_prefix)]
    rated = with_rates(rows, previous, at)
    interval = at - previous.at if previous is not None and at > previous.at else None
    totals = bus_totals(rated, others)
    view = BusView(time=now.isoformat(timespec="seconds"), interval_s=interval, workers=rated, totals=totals)
    return view, sample_of(rows, at)


def format_duration(seconds: float | None) -> str:
    """`42s`, `7m05s`, `3h12m`, `2d04h`; `-` when unknown. For tables (the web page does the same in JS)."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class BusSampler:
    """Keeps recent samples so that each view's tokens/s spans at least `min_interval` seconds when it can
    (frequent callers, such as several open pages, then do not shrink the interval to noise)."""

    def __init__(self, min_interval: float = MIN_RATE_INTERVAL, *, subject_prefix: str | None = None) -> None:
        self.min_interval = min_interval
        self.subject_prefix = subject_prefix
        self._samples: deque[Sample] = deque()

    def observe(
        self, infos: Iterable[Reply], stats: Iterable[Reply], now: datetime | None = None, at: float | None = None
    ) -> BusView:
        now = datetime.now(UTC) if now is None else now
        at = time.monotonic() if at is None else at
        view, sample = bus_view(infos, stats, now, at, self._base(at), self.subject_prefix)
        self._samples.append(sample)
        while len(self._samples) > 1 and at - self._samples[1].at >= self.min_interval:
            self._samples.popleft()  # the newest sample old enough to measure against stays first
        return view

    def _base(self, at: float) -> Sample | None:
        """The newest sample at least `min_interval` old, else the oldest one kept."""
        old_enough = [sample for sample in self._samples if at - sample.at >= self.min_interval]
        if old_enough:
            return old_enough[-1]
        return self._samples[0] if self._samples else None
