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
A figure no `$SRV.STATS` answer gave (a login that may not publish it, such as the client role) shows as `-`, its
state as `unknown`, and a note says so. Only the workers on `subject_prefix` are shown. Every name from the bus
is shown as text with its control characters escaped: any service may answer `$SRV`, and an escape sequence in a
model name must not reach the terminal.
"""

from __future__ import annotations

import asyncio
import unicodedata
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bus_gateway.bus_view import BusSampler, BusTotals, BusView, format_duration
from bus_gateway.client import BusClient
from bus_gateway.worker_rows import WorkerRow
from llmbus.config import Config
from llmbus.urls import redact_urls
from schemas import SERVICE_NAME

RATE_WINDOW = 1.0
MIN_NAME = 12
MAX_WORKER = 24
FIXED = {"device": 11, "run": 3, "wait": 4, "tok/s": 7, "up": 6, "state": 8}  # column widths
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")  # C0, C1, DEL; bidi overrides and other format characters; separators


def printable(text: str) -> str:
    """`text` from the bus, fit for a terminal: every control or format character (ESC, BEL, CSI, DEL, a bidi
    override, a line separator) escaped as `\\x1b` or `\\u202e`, so that it shows and does nothing."""
    if text.isprintable():
        return text
    return "".join(escaped(ch) if unicodedata.category(ch) in UNPRINTABLE else ch for ch in text)


def escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def device_of(row: WorkerRow) -> str:
    dtype = DTYPES.get(row.dtype, row.dtype)
    return printable(f"{row.device}/{dtype}" if row.device and dtype else row.device or dtype or "-")


def worker_of(row: WorkerRow, width: int) -> str:
    """host:pid in `width` characters, the host cut short so that the pid always shows."""
    pid = f":{row.pid if row.pid is not None else '?'}"
    host = printable(row.host) or "?"
    room = max(1, width - len(pid))
    return (host if len(host) <= room else host[: room - 1] + "…") + pid


def rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:,.1f}"


def figure(value: int | None, thousands: bool = False) -> str:
    """A count, or `-` when no STATS answer gave it."""
    return "-" if value is None else f"{value:,}" if thousands else str(value)


def workers_table(rows: list[WorkerRow], width: int) -> Table:
    """Fixed widths for the figures; the model column, then the worker column share what is left of `width`."""
    flexible = max(2 * MIN_NAME, width - sum(FIXED.values()) - len(FIXED) - 1)  # one space between columns
    longest = max(len(printable(row.model) or "-") for row in rows)
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
            Text(printable(row.model) or "-"),
            Text(device_of(row)),
            figure(row.running),
            figure(row.waiting),
            rate(row.tokens_per_s),
            format_duration(row.uptime_s),
            Text(printable(row.state), style=STATE_STYLES.get(row.state, "")),
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
    load = [workers, f"{figure(t.running)} running", f"{figure(t.waiting)} waiting", f"{rate(t.tokens_per_s)} tok/s"]
    answers = [f"{figure(n, True)} {name}" for n, name in ((t.requests, "requests"), (t.errors, "errors"))]
    answers.append(f"{figure(t.cancelled, True)} cancelled")
    models = ", ".join(printable(model) for model in t.models)
    return [" · ".join(load), " · ".join(answers) + " · models: " + models]


def stats_note(t: BusTotals) -> str | None:
    """Why figures show as `-`: no worker (or not every worker) answered `$SRV.STATS`."""
    if t.stats_answers == t.workers:
        return None
    subject = f"$SRV.STATS.{SERVICE_NAME}"
    if t.stats_answers == 0:  # such as the client role, which may publish $SRV.INFO only
        return f"no worker answered {subject}: this login may lack the permission"
    return f"{t.workers - t.stats_answers} of {t.workers} workers did not answer {subject} (their figures: -)"


def empty_note(t: BusTotals, subject_prefix: str) -> str:
    if not t.other_prefixes:
        return f"no worker answers $SRV.STATS.{SERVICE_NAME} on this bus"
    others = ", ".join(printable(prefix) for prefix in t.other_prefixes)
    return f"no worker on subject prefix {subject_prefix} (workers on {others}: choose with --subject-prefix)"


def render(view: BusView, where: str, width: int = 80, subject_prefix: str = "llm") -> RenderableType:
    when = datetime.fromisoformat(view.time).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = Text.assemble(("llmbus status", "bold"), f"  {where}  {when}")
    if not view.workers:
        return Group(title, Text(empty_note(view.totals, subject_prefix), style="yellow"))
    lines = [Text(line, overflow="ellipsis", no_wrap=True) for line in totals_lines(view)]
    if (note := stats_note(view.totals)) is not None:
        lines.append(Text(note, style="yellow", overflow="ellipsis", no_wrap=True))
    return Group(title, workers_table(view.workers, width), *lines)


async def observe(bus: BusClient, sampler: BusSampler) -> BusView:
    infos, stats = await asyncio.gather(bus.info(), bus.stats())
    return sampler.observe(infos, stats)


async def run_status(config: Config, watch: bool, interval: float, console: Console | None = None) -> int:
    """Print the bus once (exit 1 when no worker answers), or redraw it every `interval` s until cancelled."""
    console = console or Console()
    where, prefix = redact_urls(config.nats_url), config.subject_prefix
    bus = await BusClient.from_config(config, name="llmbus-status")
    try:
        sampler = BusSampler(min_interval=min(RATE_WINDOW, interval), subject_prefix=config.subject_prefix)
        view = await observe(bus, sampler)
        if not watch:
            await asyncio.sleep(RATE_WINDOW)
            view = await observe(bus, sampler)
            console.print(render(view, where, console.width, prefix))
            return 0 if view.workers else 1
        if not console.is_terminal:  # piped: one table after another
            while True:
                console.print(render(view, where, console.width, prefix), "")
                await asyncio.sleep(interval)
                view = await observe(bus, sampler)
        with Live(render(view, where, console.width, prefix), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await observe(bus, sampler), where, console.width, prefix), refresh=True)
    finally:
        await bus.close(drain=False)  # it only reads: Ctrl-C leaves at once, with no drain to wait for
