"""The bench's settings, one typed object (`BenchOptions`) filled from the command line; and what every phase
shares: `progress` lines on stderr and `BenchError`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmbus.bench.cores import physical_cores, pin_problem, read_topology
from llmbus.config import CONNECTION_FIELDS, Config, add_arguments

PEER_API_KEY_ENV = "LLMBUS_BENCH_PEER_API_KEY"
HTTP_API_KEY_ENV = "LLMBUS_BENCH_HTTP_API_KEY"


@dataclass(slots=True)
class BenchOptions:
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    rounds: int = 1
    max_tokens: int = 128
    requests_per_client: int = 2
    min_requests: int = 8
    point_time_cap: float = 120.0
    request_timeout: float = 300.0
    workers: int = 1
    worker_threads: int = 0
    nats_url: str | None = None
    subject_prefix: str = "llm"
    out: Path = Path("bench-results")
    skip_baselines: bool = False
    ceiling: str = "hf"
    naive_requests: int = 8
    naive_threads: int = 8
    baseline_time_cap: float = 60.0
    warmup_requests: int = 8
    ready_timeout: float = 180.0
    compile_timeout: float = 900.0
    seed: int = 0
    model: str | None = None
    served_model: str | None = None  # the model to measure on a --nats-url bus that serves several
    device: str = "auto"
    dtype: str = "auto"
    worker_args: list[str] = field(default_factory=list)
    pin: bool = False
    cores_per_worker: int = 0
    http: bool = False
    http_url: str | None = None
    peer_url: str | None = None
    peer_model: str | None = None
    connection: Config = field(default_factory=Config)  # the NATS login settings (--nats-creds... or LLMBUS_*)

    @property
    def peer_api_key(self) -> str | None:
        """From the environment only, so that it never shows in `ps`, the JSON or the log."""
        return os.environ.get(PEER_API_KEY_ENV) or None

    @property
    def http_api_key(self) -> str | None:
        return os.environ.get(HTTP_API_KEY_ENV) or None


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmbus bench", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchOptions()
    load = p.add_argument_group("workload")
    load.add_argument("--concurrency", type=int_list, default=d.concurrency, help="client counts, comma-separated")
    load.add_argument(
        "--rounds",
        type=int,
        default=d.rounds,
        help="measure each concurrency N times, the targets (NATS, --http, --peer-url and, with N > 1 and the "
        "baselines, the eager ceiling) in alternating order, and report each target's rounds as one point: a "
        "steady drift of a shared machine's speed cancels out of their ratios. With N > 1 the bench keeps its "
        "baseline model loaded while the workers run",
    )
    load.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max_tokens of every request")
    load.add_argument("--requests-per-client", type=int, default=d.requests_per_client, help="requests per client")
    load.add_argument("--min-requests", type=int, default=d.min_requests, help="at least this many requests per point")
    load.add_argument("--point-time-cap", type=float, default=d.point_time_cap, help="seconds; then no new requests")
    load.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="idle timeout in seconds: how long a request may wait for its first chunk, and then for each next "
        "one, over NATS and HTTP alike (a long answer that keeps streaming is never cut)",
    )
    load.add_argument("--warmup-requests", type=int, default=d.warmup_requests, help="untimed requests per target")
    load.add_argument("--seed", type=int, default=d.seed, help="seed of the prompt order")

    stack = p.add_argument_group("the stack under test")
    stack.add_argument("--workers", type=int, default=d.workers, help="workers to start (--nats-url: to wait for)")
    stack.add_argument(
        "--worker-threads", type=int, default=d.worker_threads, help="torch threads per worker (0: auto)"
    )
    stack.add_argument("--nats-url", default=None, help="use this NATS server and its workers instead of starting them")
    stack.add_argument("--subject-prefix", default=d.subject_prefix, help="subject prefix of the workers")
    add_arguments(stack, CONNECTION_FIELDS)
    stack.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    stack.add_argument(
        "--served-model",
        default=None,
        metavar="NAME",
        help="the model (its name in $SRV.INFO) that NATS and HTTP requests name, for a --nats-url bus that serves "
        "several (default: the bus's default model, else its only one)",
    )
    stack.add_argument("--device", default=d.device, help="device of the workers and the baselines: auto, cpu, cuda")
    stack.add_argument("--dtype", default=d.dtype, help="dtype of the workers and the baselines: auto, bfloat16, ...")
    stack.add_argument(
        "--worker-arg",
        dest="worker_args",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `llmbus worker`, repeatable; write it with '=': --worker-arg=--quantize "
        "--worker-arg=int8",
    )
    stack.add_argument(
        "--pin",
        action="store_true",
        help="give each worker whole physical cores of its own (CPU affinity: every hyper-thread of those cores, "
        "none shared with another worker; each CPU counts as a core where sysfs shows no topology), torch threads "
        "= its logical CPUs; the bench client, nats-server and bridge are not pinned",
    )
    stack.add_argument(
        "--cores-per-worker",
        type=int,
        default=d.cores_per_worker,
        help="with --pin: whole physical cores per worker (0: physical cores/N)",
    )

    http = p.add_argument_group("HTTP and a peer server")
    http.add_argument(
        "--http",
        action="store_true",
        help="also measure through the HTTP bridge's OpenAI endpoint, back to back with NATS at each concurrency "
        "(the bench starts `llmbus gateway` in its own process unless --http-url)",
    )
    http.add_argument(
        "--http-url",
        default=None,
        help=f"an existing bridge on the --nats-url bus to measure (implies --http; key: env {HTTP_API_KEY_ENV})",
    )
    http.add_argument(
        "--peer-url",
        default=None,
        help="base URL of any OpenAI-compatible server (llama.cpp, vLLM, transformers serve) to measure with the same "
        f"workload, e.g. http://127.0.0.1:8080 (key: env {PEER_API_KEY_ENV})",
    )
    http.add_argument("--peer-model", default=None, help="the model name to send to the peer (needed with --peer-url)")

    base = p.add_argument_group("in-process baselines")
    base.add_argument("--skip-baselines", action="store_true", help="skip the eager ceiling, prefill and naive phase")
    base.add_argument(
        "--ceiling", choices=["hf"], default=d.ceiling, help="the engine ceiling: the transformers eager decode loop"
    )
    base.add_argument("--naive-requests", type=int, default=d.naive_requests, help="requests of the naive baseline")
    base.add_argument("--naive-threads", type=int, default=d.naive_threads, help="threads of the naive baseline")
    base.add_argument(
        "--baseline-time-cap",
        type=float,
        default=d.baseline_time_cap,
        help="seconds each ceiling loop and the naive baseline may take (fewer steps/tokens past it)",
    )
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds to wait for the workers")
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=d.compile_timeout,
        help="seconds to wait for the workers' decode step to compile (minutes on a small CPU)",
    )
    p.add_argument("--out", type=Path, default=d.out, help="directory for bench.json, bench.png and the process logs")
    return p


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma-separated, e.g. 1,8,32,64")
    return sorted(set(values))


def parse_options(argv: Sequence[str], description: str | None = None) -> BenchOptions:
    parser = build_parser(description)
    args = parser.parse_args(list(argv))
    opts = BenchOptions(**{f.name: getattr(args, f.name) for f in fields(BenchOptions) if f.name != "connection"})
    try:
        opts.connection = Config.load(args)
    except ValueError as exc:
        parser.error(f"invalid setting: {exc}")
    problem = check(opts)
    if problem:
        parser.error(problem)
    opts.http = opts.http or opts.http_url is not None
    opts.http_url = base_url(opts.http_url) if opts.http_url else None
    opts.peer_url = base_url(opts.peer_url) if opts.peer_url else None
    return opts


def check(opts: BenchOptions) -> str | None:
    """The first inconsistent setting, said plainly; None when they fit together."""
    for name in ("workers", "max_tokens", "requests_per_client", "naive_threads", "rounds"):
        if getattr(opts, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("point_time_cap", "request_timeout", "baseline_time_cap"):
        if not getattr(opts, name) > 0:  # NaN too
            return f"--{name.replace('_', '-')} must be a positive number of seconds"
    if opts.peer_url and not opts.peer_model:
        return "--peer-url needs --peer-model NAME (the model name the peer serves)"
    if opts.peer_model and not opts.peer_url:
        return "--peer-model needs --peer-url URL"
    for url in (opts.peer_url, opts.http_url):
        if url and not url.startswith(("http://", "https://")):
            return f"expected an http:// or https:// URL, got {url!r}"
    if opts.http_url and not opts.nats_url:
        return (
            "--http-url needs --nats-url URL of the bus that bridge uses, so that NATS and HTTP reach the same "
            "workers (or use --http: the bench starts a bridge on its own bus)"
        )
    if opts.cores_per_worker and not opts.pin:
        return "--cores-per-worker needs --pin"
    if opts.pin and opts.nats_url:
        return "--pin needs workers the bench starts itself (no --nats-url)"
    if opts.pin:
        available = os.sched_getaffinity(0)
        cores = physical_cores(available, read_topology(available))
        if problem := pin_problem(cores, opts.workers, opts.cores_per_worker):
            return f"--pin: {problem}"
    return None


def base_url(url: str) -> str:
    """`http://host:port`, whether given with a trailing slash or `/v1` or not."""
    return url.rstrip("/").removesuffix("/v1").rstrip("/")


def progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A run that cannot go on (a process died, a target failed its warm-up); main prints it and exits 1."""
