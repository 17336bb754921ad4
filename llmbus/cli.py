"""The `llmbus` command: parses arguments (cli_parser.py) and dispatches. The work lives in stack.py, schemas/export.py
and bench.py."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import nats.errors

from llmbus import __version__, process_gc, tracing
from llmbus.cli_parser import LOG_LEVELS, build_parser
from llmbus.config import Config, env_value
from llmbus.logs import FORMATS, setup_logging
from llmbus.permissions import check_names, grants, jwt_permissions, server_permissions
from llmbus.stack import Part, run_stack
from llmbus.urls import redact_urls
from schemas.subjects import DEFAULT_QUEUE_GROUP

DEFAULT_METRICS_PORT = 9464  # `llmbus up`: the worker's Prometheus endpoint unless --metrics-port says otherwise


def uses_existing_nats(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return args.nats_url is not None or env_value(env, "nats_url") is not None  # an empty variable is unset


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench_command(argv[1:])
    if argv[:1] == ["quality"]:
        from llmbus import quality  # loads torch: only for this command

        return quality.main(argv[1:])
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    return command(args)


def up_command(args: argparse.Namespace) -> int:
    return serve(args, ["worker", "gateway"], embedded_nats=not uses_existing_nats(args), metrics=DEFAULT_METRICS_PORT)


def worker_command(args: argparse.Namespace) -> int:
    return serve(args, ["worker"])


def gateway_command(args: argparse.Namespace) -> int:
    return serve(args, ["gateway"])


def serve(args: argparse.Namespace, parts: list[Part], embedded_nats: bool = False, metrics: int | None = None) -> int:
    """Run `parts`; `metrics`: the worker's metrics port when --metrics-port is unset (`llmbus up`). The garbage
    collector stays off until the parts are ready (`process_gc.py`)."""
    try:
        config = Config.load(args)
        check_logging_settings(args)
    except (ValueError, TypeError) as exc:
        print(f"llmbus: error: invalid setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format, config.log_prompts)
    try:
        traces = tracing.setup_from_env("llmbus" if len(parts) > 1 else f"llmbus-{parts[0]}")
    except RuntimeError as exc:
        print(f"llmbus: error: {exc}", file=sys.stderr)
        return 2
    if traces is not None:
        logging.getLogger("llmbus").info("tracing: spans exported over %s", traces)
    store_dir = getattr(args, "nats_store_dir", None)
    process_gc.pause()
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
            return runner.run(run_stack(config, parts, embedded_nats, store_dir, default_metrics_port=metrics))
    finally:
        process_gc.resume()
        tracing.shutdown()


def check_logging_settings(args: argparse.Namespace) -> None:
    """The log level and format, which may come from LLMBUS_LOG_LEVEL / LLMBUS_LOG_FORMAT: argparse checks a flag's
    choices, but not a default taken from the environment."""
    if args.log_level not in LOG_LEVELS:
        raise ValueError(f"LLMBUS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    if args.log_format not in FORMATS:
        raise ValueError(f"LLMBUS_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {args.log_format!r}")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The serving process's event loop (`event_loop`): uvloop where it is installed, since on a host the engine
    shares, every message the bridge or the worker's asyncio side handles takes CPU from the decode step; None
    (asyncio's own) otherwise."""
    if name != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("llmbus").warning("uvloop is not installed: the standard asyncio loop runs")
        return None
    return uvloop.new_event_loop


def status_command(args: argparse.Namespace) -> int:
    from llmbus.connection import ConnectionSettingsError, NatsConnectError
    from llmbus.status import run_status

    if args.interval < 0.5:
        print("llmbus: error: --interval must be at least 0.5 seconds", file=sys.stderr)
        return 2
    try:
        config = Config.load(args)
    except (ValueError, TypeError) as exc:
        print(f"llmbus: error: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_status(config, args.watch, args.interval))
    except KeyboardInterrupt:
        return 0
    except (ConnectionSettingsError, NatsConnectError, OSError, nats.errors.Error) as exc:
        print(f"llmbus: error: cannot read the bus at {redact_urls(config.nats_url)}: {exc}", file=sys.stderr)
        return 1


def nats_permissions_command(args: argparse.Namespace) -> int:
    try:
        role_grants = grants(
            args.role, args.subject_prefix, args.inbox_prefix, args.durable, args.queue_group, model=args.model
        )
    except ValueError as exc:
        print(f"llmbus: error: {exc}", file=sys.stderr)
        return 2
    block = server_permissions(role_grants) if args.format == "server" else jwt_permissions(role_grants)
    print(json.dumps(block, indent=2))
    return 0


def schema_command(args: argparse.Namespace) -> int:
    from schemas.asyncapi import asyncapi_json
    from schemas.export import json_schemas, write_json_schemas

    if args.asyncapi:
        if problem := check_names(args.subject_prefix, None, DEFAULT_QUEUE_GROUP):
            print(f"llmbus: error: {problem}", file=sys.stderr)
            return 2
        document = asyncapi_json(__version__, args.subject_prefix)
        if args.out is None:
            print(document, end="")
            return 0
        try:
            args.out.write_text(document)
        except OSError as exc:
            print(f"llmbus: error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
        print(args.out)
        return 0
    if args.out is None:
        print(json.dumps(json_schemas(), indent=2, sort_keys=True))
        return 0
    for path in write_json_schemas(args.out):
        print(path)
    return 0


def bench_command(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("llmbus.bench")
    except ModuleNotFoundError as exc:
        if exc.name == "llmbus.bench":
            print("llmbus: error: this version has no benchmark (llmbus/bench.py is missing)", file=sys.stderr)
        else:
            print(f"llmbus: error: the benchmark needs {exc.name}: pip install 'llmbus[bench]'", file=sys.stderr)
        return 2
    return bench.main(argv) or 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": up_command,
    "worker": worker_command,
    "gateway": gateway_command,
    "schema": schema_command,
    "nats-permissions": nats_permissions_command,
    "status": status_command,
}


def run() -> None:
    """The `llmbus` command: main(), then the process's exit."""
    code = main()
    warm_up = sys.modules.get("inference_worker.warm_up")
    if warm_up is not None and warm_up.compiling():
        # A decode step still compiling on its daemon thread makes the interpreter's own exit abort ("terminate
        # called without an active exception", status -6). Everything is stopped and flushed by now: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
