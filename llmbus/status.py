"""`llmbus status [--watch]`: every worker on the bus and the bus totals, as a table that fits 80 columns.

Built from `$SRV.INFO` and `$SRV.STATS` by `bus_gateway.bus_view` (the same view as the bridge's `/bus.json`).
Tokens/s needs two samples, so a one-shot status samples twice, `RATE_WINDOW` seconds apart; `--watch` redraws
every `--interval` seconds until Ctrl-C (on a terminal in place, otherwise one table after another).

    llmbus status  nats://127.0.0.1:4222  2026-11-26 03:23:45 UTC
    worker        model                 device      run wait   tok/s     up state
    vm:15894      SmolLM2-135M-Instruct cpu/bf16      7    0    29.8    26s serving
    vm:15947      SmolLM2-135M-Instruct cpu/bf16      5    0    21.3    20s serving
    2 workers · 12 running · 0 waiting · 51.0 tok/s
    12 requests · 0 errors · 0 cancelled · models: SmolLM2-135M-Instruct

The state column: serving; warming (its decode step is compiling, and it serves eagerly meanwhile); degraded (its
compiled decode step failed, so it decodes eagerly, several times slower on a GPU: its log has the error); draining.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bus_gateway.bus_view import BusSampler, BusView, WorkerRow, format_duration
from bus_gateway.client import BusClient
from llmbus.config import Config
from llmbus.connection import redact_urls
from schemas import SERVICE_NAME

RATE_WINDOW = 1.0
MIN_NAME = 12
MAX_WORKER = 24
FIXED = {"device": 11, "run": 3, "wait": 4, "tok/s": 7, "up": 6, "state": 8}  # column widths
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def device_of(row: WorkerRow) -> str:
    dtype = DTYPES.get(row.dtype, row.dtype)
    return f"{row.device}/{dtype}" if row.device and dtype else row.device or dtype or "-"


def worker_of(row: WorkerRow, width: int) -> str:
    """host:pid in `width` characters, the host cut short so that the pid always shows."""
    pid = f":{row.pid if row.pid is not None else '?'}"
    host = row.host or "?"
    room = max(1, width - len(pid))
    return (host if len(host) <= room else host[: room - 1] + "…") + pid


def rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:,.1f}"


def workers_table(rows: list[WorkerRow], width: int) -> Table:
    """Fixed widths for the figures; the model column, then the worker column share what is left of `width`."""
    flexible = max(2 * MIN_NAME, width - sum(FIXED.values()) - len(FIXED) - 1)  # one space between columns
    longest = max(len(row.model or "-") for row in rows)
    model = max(MIN_NAME, min(longest, flexible - MIN_NAME))
    worker = min(flexible - model, MAX_WORKER)
    table = Table(box=None, padding=(0, 1), pad_edge=False, collapse_padding=True, header_style="bold")
    table.add_column("worker", no_wrap=True, overflow="ellipsis", width=worker)
    table.add_column("model", no_wrap=True, overflow="ellipsis", width=flexible - worker)
    for name, size in FIXED.items():
        justify = "left" if name in ("device", "state") else "right"
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis", width=size)
    for row in rows:
        table.add_row(  # names from $SRV answers as Text, never read as rich markup
            Text(worker_of(row, worker)),
            Text(row.model or "-"),
            Text(device_of(row)),
            str(row.running),
            str(row.waiting),
            rate(row.tokens_per_s),
            format_duration(row.uptime_s),
            Text(row.state, style=STATE_STYLES.get(row.state, "")),
        )
    return table


STATE_STYLES = {"draining": "yellow", "degraded": "red", "warming": "cyan", "serving": "green"}


def totals_lines(view: BusView) -> list[str]:
    t = view.totals
    workers = f"{t.workers} worker{'s' if t.workers != 1 else ''}"
    notes = [f"{t.draining} draining"] if t.draining else []
    notes += [f"{t.compile_failed} degraded"] if t.compile_failed else []
    if notes:
        workers += f" ({', '.join(notes)})"
    load = [workers, f"{t.running} running", f"{t.waiting} waiting", f"{rate(t.tokens_per_s)} tok/s"]
    answers = [f"{t.requests:,} requests", f"{t.errors:,} errors", f"{t.cancelled:,} cancelled"]
    return [" · ".join(load), " · ".join(answers) + " · models: " + ", ".join(t.models)]


def render(view: BusView, where: str, width: int = 80) -> RenderableType:
    when = datetime.fromisoformat(view.time).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = Text.assemble(("llmbus status", "bold"), f"  {where}  {when}")
    if not view.workers:
        return Group(title, Text(f"no worker answers $SRV.STATS.{SERVICE_NAME} on this bus", style="yellow"))
    totals = [Text(line, overflow="ellipsis", no_wrap=True) for line in totals_lines(view)]
    return Group(title, workers_table(view.workers, width), *totals)


async def observe(bus: BusClient, sampler: BusSampler) -> BusView:
    infos, stats = await asyncio.gather(bus.info(), bus.stats())
    return sampler.observe(infos, stats)


async def run_status(config: Config, watch: bool, interval: float, console: Console | None = None) -> int:
    """Print the bus once (exit 1 when no worker answers), or redraw it every `interval` s until cancelled."""
    console = console or Console()
    where = redact_urls(config.nats_url)
    bus = await BusClient.from_config(config, name="llmbus-status")
    try:
        sampler = BusSampler(min_interval=min(RATE_WINDOW, interval))
        view = await observe(bus, sampler)
        if not watch:
            await asyncio.sleep(RATE_WINDOW)
            view = await observe(bus, sampler)
            console.print(render(view, where, console.width))
            return 0 if view.workers else 1
        if not console.is_terminal:  # piped: one table after another
            while True:
                console.print(render(view, where, console.width), "")
                await asyncio.sleep(interval)
                view = await observe(bus, sampler)
        with Live(render(view, where, console.width), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await observe(bus, sampler), where, console.width), refresh=True)
    finally:
        await bus.close(drain=False)  # it only reads: Ctrl-C leaves at once, with no drain to wait for
