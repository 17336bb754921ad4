"""One row per worker, from its `$SRV.INFO` and `$SRV.STATS` replies (`bus_view` adds the rates and totals).

The functions here are pure, and accept partial or odd replies (a worker from another version, a missing field, a
number sent as a string): what is missing from a reply reads as 0, "" or None, never as an error; a worker without a
STATS answer (a login that may not publish `$SRV.STATS`, or a late answer) has None figures: unknown, never 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

Reply = Mapping[str, Any]


class WorkerRow(msgspec.Struct, kw_only=True):
    """One worker. `requests`/`errors` are the messages its endpoints handled and failed (a batch counts once);
    `cancelled` is requests stopped by a cancel. `tokens_per_s` is None until two samples exist. `compile` is its
    decode step's state: off, compiling, ready, or failed (it then decodes eagerly, several times slower on a GPU).
    `state` is what `llmbus status` and the web page show (`worker_state`). `stats` says whether it answered
    `$SRV.STATS`: without that answer its figures, `draining` included, are None and its state is `unknown`."""

    id: str
    host: str = ""
    pid: int | None = None
    model: str = ""
    device: str = ""
    dtype: str = ""
    subject_prefix: str = ""
    stats: bool = False
    running: int | None = None
    waiting: int | None = None
    tokens_generated: int | None = None
    tokens_per_s: float | None = None
    uptime_s: float | None = None
    draining: bool | None = None
    compile: str = ""
    state: str = "unknown"
    requests: int | None = None
    errors: int | None = None
    cancelled: int | None = None


def worker_rows(infos: Iterable[Reply], stats: Iterable[Reply], now: datetime) -> list[WorkerRow]:
    """One row per worker id seen in either list (STATS metadata fills in for a missing INFO reply)."""
    info_by_id = _by_id(infos)
    stats_by_id = _by_id(stats)
    rows = [
        worker_row(worker_id, info_by_id.get(worker_id, {}), stats_by_id.get(worker_id), now)
        for worker_id in dict.fromkeys([*info_by_id, *stats_by_id])
    ]
    return sorted(rows, key=lambda row: (row.host, row.pid or 0, row.id))


def worker_state(draining: bool, compile: str) -> str:
    """draining; degraded (its compiled decode step failed: it decodes eagerly, see its log); warming (its decode
    step is compiling, and it serves eagerly meanwhile); or serving. The first that applies."""
    if draining:
        return "draining"
    return {"failed": "degraded", "compiling": "warming"}.get(compile, "serving")


def worker_row(worker_id: str, info: Reply, stats: Reply | None, now: datetime) -> WorkerRow:
    metadata = {**_mapping((stats or {}).get("metadata")), **_mapping(info.get("metadata"))}
    identity = WorkerRow(
        id=worker_id,
        host=_text(metadata.get("host")),
        pid=_int_or_none(metadata.get("pid")),
        model=_text(metadata.get("model")),
        device=_text(metadata.get("device")),
        dtype=_text(metadata.get("dtype")),
        subject_prefix=_text(metadata.get("subject_prefix")),
    )
    if stats is None:  # no STATS answer: its load is unknown, not 0
        return identity
    endpoints = [_mapping(endpoint) for endpoint in _sequence(stats.get("endpoints"))]
    data = next((endpoint["data"] for endpoint in endpoints if isinstance(endpoint.get("data"), Mapping)), {})
    draining, compile = data.get("draining") is True, _text(data.get("compile"))
    return msgspec.structs.replace(
        identity,
        stats=True,
        running=_int(data.get("running")),
        waiting=_int(data.get("waiting")),
        tokens_generated=_int(data.get("tokens_generated")),
        uptime_s=uptime_seconds(stats.get("started"), now),
        draining=draining,
        compile=compile,
        state=worker_state(draining, compile),
        requests=sum(_int(endpoint.get("num_requests")) for endpoint in endpoints),
        errors=sum(_int(endpoint.get("num_errors")) for endpoint in endpoints),
        cancelled=_int(data.get("requests_cancelled")),
    )


def uptime_seconds(started: Any, now: datetime) -> float | None:
    """Seconds since the micro `started` time (ISO 8601, UTC); None when absent or unreadable."""
    if not isinstance(started, str):
        return None
    try:
        since = datetime.fromisoformat(started)
    except ValueError:
        return None
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return max(0.0, (now - since).total_seconds())


def _by_id(replies: Iterable[Reply]) -> dict[str, Reply]:
    out: dict[str, Reply] = {}
    for reply in replies:
        if isinstance(reply, Mapping) and isinstance(reply.get("id"), str) and reply["id"]:
            out[reply["id"]] = reply
    return out


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _int(value: Any) -> int:
    number = _int_or_none(value)
    return number if number is not None and number >= 0 else 0
