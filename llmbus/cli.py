"""The `llmbus` command: parses arguments and dispatches. The work lives in stack.py, schemas/export.py and bench.py."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nats.errors

from llmbus import __version__, tracing
from llmbus.config import CONNECTION_FIELDS, ENV_PREFIX, Config, add_arguments
from llmbus.connection import redact_urls
from llmbus.logs import FORMATS, setup_logging
from llmbus.permissions import ROLES, check_names, grants, jwt_permissions, server_permissions
from llmbus.stack import Part, run_stack
from schemas.subjects import DEFAULT_PREFIX, DEFAULT_QUEUE_GROUP

GATEWAY_ONLY_FIELDS = (
    "http_host",
    "http_port",
    "request_timeout",
    "api_keys",
    "api_key_file",
    "http_tls_cert",
    "http_tls_key",
    "rate_limit_per_minute",
    "cors_origins",
)
BUS_FIELDS = ("nats_url", "subject_prefix", "queue_group", "durable", *CONNECTION_FIELDS)
STACK_ONLY_FIELDS = ("nats_port", "secure", "secure_dir")
DEFAULT_METRICS_PORT = 9464  # `llmbus up`: the worker's Prometheus endpoint unless --metrics-port says otherwise

ALL_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
WORKER_FIELDS = tuple(name for name in ALL_FIELDS if name not in GATEWAY_ONLY_FIELDS + STACK_ONLY_FIELDS)
GATEWAY_FIELDS = tuple(name for name in ALL_FIELDS if name in BUS_FIELDS + GATEWAY_ONLY_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmbus",
        description="LLM chat inference over NATS. Every flag also reads from LLMBUS_<NAME> (e.g. LLMBUS_HTTP_PORT).",
    )
    parser.add_argument("--version", action="version", version=f"llmbus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="run nats-server, one worker and the HTTP bridge on loopback", description=UP_DESCRIPTION
    )
    add_arguments(up, ALL_FIELDS)
    up.add_argument(
        "--nats-store-dir", default=None, help="JetStream storage directory (default: a temporary one, removed on exit)"
    )
    add_logging_argument(up)

    worker = commands.add_parser("worker", help="run one inference worker against an existing NATS server")
    add_arguments(worker, WORKER_FIELDS)
    add_logging_argument(worker)

    gateway = commands.add_parser("gateway", help="run the HTTP bridge against an existing NATS server")
    add_arguments(gateway, GATEWAY_FIELDS)
    add_logging_argument(gateway)

    permissions = commands.add_parser(
        "nats-permissions",
        help="print the least-privilege NATS permissions of a role (JSON for a nats-server user entry or a user JWT)",
        description=PERMISSIONS_DESCRIPTION,
    )
    permissions.add_argument("--role", required=True, choices=ROLES, help="who connects with these permissions")
    permissions.add_argument("--subject-prefix", default=DEFAULT_PREFIX, help="the workers' subject prefix")
    permissions.add_argument(
        "--inbox-prefix",
        default=None,
        help="the role's reply inbox prefix, set with --nats-inbox-prefix when it connects (default _INBOX.<role>)",
    )
    permissions.add_argument("--queue-group", default=DEFAULT_QUEUE_GROUP, help="the workers' queue group")
    permissions.add_argument("--durable", action="store_true", help="add what durable (JetStream) jobs need")
    permissions.add_argument(
        "--model", default=None, help="worker: its served model name (default: any model's per-model subjects)"
    )
    permissions.add_argument(
        "--format",
        choices=["server", "jwt"],
        default="server",
        help="server: the `permissions` block of a nats-server user entry; jwt: the pub/sub/resp claims of a user JWT",
    )

    status = commands.add_parser(
        "status",
        help="every worker on the bus (host, pid, model, load, tokens/s, uptime) and the bus totals",
        description="A table of every worker on the bus, from $SRV.INFO and $SRV.STATS, and the bus totals.",
    )
    add_arguments(status, ("nats_url", *CONNECTION_FIELDS))
    status.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws with --watch (>= 0.5)")

    schema = commands.add_parser(
        "schema", help="print the JSON Schemas of the wire messages, or the AsyncAPI document of the bus, or write them"
    )
    schema.add_argument(
        "--asyncapi", action="store_true", help="the AsyncAPI 3.0 document of the whole NATS interface instead"
    )
    schema.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write one <message>.schema.json per message in this directory (with --asyncapi: this file)",
    )
    schema.add_argument(
        "--subject-prefix", default=DEFAULT_PREFIX, help="with --asyncapi: the workers' subject prefix (default llm)"
    )

    commands.add_parser("bench", help="benchmark a running stack (`llmbus bench --help` for its flags)", add_help=False)
    commands.add_parser(
        "quality",
        help="perplexity and QA exact match of the engine, per --quantize mode (`llmbus quality --help`)",
        add_help=False,
    )
    return parser


UP_DESCRIPTION = (
    "Start an embedded nats-server (JetStream on), one worker and the HTTP bridge in one process, all on loopback. "
    "With --nats-url (or LLMBUS_NATS_URL) it joins that server instead of starting one. Ctrl-C or SIGTERM stops all."
)


PERMISSIONS_DESCRIPTION = (
    "Print, as JSON, the least-privilege permissions of one llmbus role. worker: its endpoints, cancels and $SRV, "
    "replies only (allow_responses max -1, expires 1h, for long streams). client: requests and cancels, and only its "
    "own inbox prefix. gateway: a client that may also read $SRV.STATS. Give each client its own --inbox-prefix "
    "(_INBOX.<name>) and connect it with the same --nats-inbox-prefix."
)


def add_logging_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default=os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the stderr log (env LLMBUS_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get(f"{ENV_PREFIX}LOG_FORMAT", "text").lower(),
        choices=FORMATS,
        help="text, or json: one JSON object per line, for log shippers (env LLMBUS_LOG_FORMAT; default text)",
    )


def uses_existing_nats(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return args.nats_url is not None or f"{ENV_PREFIX}NATS_URL" in env


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
    """Run `parts`; `metrics`: the worker's metrics port when --metrics-port is unset (`llmbus up`)."""
    try:
        config = Config.load(args)
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
    try:
        return asyncio.run(run_stack(config, parts, embedded_nats, store_dir, default_metrics_port=metrics))
    finally:
        tracing.shutdown()


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
