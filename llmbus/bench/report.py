"""`bench.json`: the settings, the machine, the workers as they reported themselves, every point of every target,
the baselines, the ratios and the notes. Keys only ever get added, so older reports stay comparable."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from llmbus.bench.baselines import Baselines
from llmbus.bench.http_load import CHAT_PATH
from llmbus.bench.options import BenchOptions
from llmbus.bench.stack import Stack
from llmbus.bench.stats import PointResult
from llmbus.bench.sweep import Sweep
from llmbus.bench.verdicts import Ratio, pairwise
from llmbus.config import Config
from llmbus.urls import redact_urls


def build_report(
    opts: BenchOptions,
    stack: Stack,
    prompts: list[str],
    baselines: Baselines | None,
    sweep: Sweep,
    ratios: list[Ratio],
    notes: list[str],
) -> dict[str, Any]:
    config = asdict(opts)
    for key in ("nats_url", "http_url", "peer_url"):
        config[key] = redact_url(config[key])
    config["connection"] = connection_settings(opts.connection)
    return {
        "config": config,
        "machine": {**machine_info(opts), "load_average_after": os.getloadavg()},
        "workload": {
            "prompts": prompts,
            "temperature": 0.0,
            "stream": True,
            "max_tokens": opts.max_tokens,
            "model": sweep.served_model,  # named in every NATS and HTTP request (None: the bus default)
        },
        "workers": {
            "count": opts.workers if not opts.nats_url else sweep.workers_seen,
            "threads": sweep.worker_processes[0]["threads"] if sweep.worker_processes else None,
            "pinned": opts.pin,
            "extra_args": list(opts.worker_args),
            "processes": sweep.worker_processes,
            "options": sweep.worker_options,
            "model": sweep.served_model,
        },
        "baselines": None if baselines is None else baselines_json(baselines),
        "warmup_s": sweep.warmup_s,
        "compile_wait_s": sweep.compile_wait_s,
        "warmups_s": sweep.warmups_s,
        "points": [point_json(p) for p in sweep.points],
        "http": None
        if not stack.http_url
        else {
            "url": redact_url(stack.http_url),
            "endpoint": CHAT_PATH,
            "model": sweep.served_model,
            "started_by_bench": opts.http_url is None,
            "process": "llmbus gateway, its own process" if opts.http_url is None else "given by --http-url",
        },
        "http_points": [point_json(p) for p in sweep.http_points],
        "http_over_nats": pairwise(sweep.http_points, sweep.points),
        "peer": None
        if not opts.peer_url
        else {
            "url": redact_url(opts.peer_url),
            "endpoint": CHAT_PATH,
            "model": opts.peer_model,
            "token_count_source": sorted({p.token_count_source for p in sweep.peer_points}),
        },
        "peer_points": [point_json(p) for p in sweep.peer_points],
        "nats_over_peer": pairwise(sweep.points, sweep.peer_points),
        "ratios": [asdict(r) for r in ratios],
        "notes": notes,
        "stopped": sweep.stopped,  # why the sweep stopped early (a worker or the bridge died); None when it did not
    }


def connection_settings(connection: Config) -> dict[str, Any]:
    """The NATS settings the bench connected with, fit for the report: a secret only as set (`***`) or not, the
    URL without credentials, and none of the Config's other fields (the bridge's API keys among them)."""
    settings: dict[str, Any] = {}
    for setting in fields(connection):
        if setting.name.startswith("nats_"):
            value = getattr(connection, setting.name)
            settings[setting.name] = ("***" if value else None) if setting.metadata.get("secret") else value
    settings["nats_url"] = redact_url(connection.nats_url)
    return settings


def redact_url(url: str | None) -> str | None:
    """The URL (or comma-separated URLs) with any password or token shown as `***` (`connection.redact_urls`)."""
    return redact_urls(url) if url else url


def machine_info(opts: BenchOptions) -> dict[str, Any]:
    import torch

    from inference_worker.hardware import cpu_flags, pick_device, pick_dtype, pick_threads

    device = pick_device(opts.device)
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "cpu_bf16": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
        "torch_threads": pick_threads(),
        "device": str(device),
        "dtype": str(pick_dtype(device, opts.dtype)).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(clean(report), indent=2, default=_json_default, allow_nan=False) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def clean(value: Any) -> Any:
    """NaN (no samples) becomes null so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def point_json(point: PointResult) -> dict[str, Any]:
    """A point's figures for bench.json: every field but its raw requests."""
    return {f.name: getattr(point, f.name) for f in fields(point) if f.name != "records"}


def baselines_json(baselines: Baselines) -> dict[str, Any]:
    """The baselines without the ceilings' step times (kept only to merge rounds)."""
    out = asdict(baselines)
    for point in [*out["ceiling"], *out["ceiling_before_stack"]]:
        del point["step_times_s"]
    return out
