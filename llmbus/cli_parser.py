"""The `llmbus` command line: its argument parser (subcommands, their flags and help), and which settings each
subcommand takes. cli.py parses with it and dispatches."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmbus import __version__
from llmbus.config import CONNECTION_FIELDS, ENV_PREFIX, Config, add_arguments, env_value, parse_bool
from llmbus.logs import FORMATS
from llmbus.permissions import ROLES
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
PROCESS_FIELDS = ("event_loop",)

ALL_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
WORKER_FIELDS = tuple(name for name in ALL_FIELDS if name not in GATEWAY_ONLY_FIELDS + STACK_ONLY_FIELDS)
GATEWAY_FIELDS = tuple(name for name in ALL_FIELDS if name in BUS_FIELDS + GATEWAY_ONLY_FIELDS + PROCESS_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmbus",
        description="LLM chat inference over NATS. Every setting's flag also reads LLMBUS_<NAME> (e.g. LLMBUS_HTTP_PORT"
        " for --http-port; a flag wins over its variable, and an empty variable counts as unset); options that are no"
        " setting (--role, --format, --out, --watch...) read none.",
    )
    parser.add_argument("--version", action="version", version=f"llmbus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="run nats-server, one worker and the HTTP bridge on loopback", description=UP_DESCRIPTION
    )
    add_arguments(up, ALL_FIELDS)
    up.add_argument(
        "--nats-store-dir",
        default=env_value(os.environ, "nats_store_dir"),
        help="JetStream storage directory (env LLMBUS_NATS_STORE_DIR; default: a temporary one, removed on exit)",
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
    permissions.add_argument(
        "--subject-prefix",
        default=env_default("subject_prefix", DEFAULT_PREFIX),
        help="the workers' subject prefix (env LLMBUS_SUBJECT_PREFIX; default llm)",
    )
    permissions.add_argument(
        "--inbox-prefix",
        default=None,
        help="the role's reply inbox prefix, _INBOX.<name>, set with --nats-inbox-prefix when it connects: required for"
        " a client (one name per user); a worker's defaults to _INBOX.worker, a gateway's to _INBOX.gateway",
    )
    permissions.add_argument(
        "--queue-group",
        default=env_default("queue_group", DEFAULT_QUEUE_GROUP),
        help=f"the workers' queue group (env LLMBUS_QUEUE_GROUP; default {DEFAULT_QUEUE_GROUP})",
    )
    permissions.add_argument(
        "--durable",
        action=EnvFlag,
        default=env_default("durable", False),
        help="add what durable (JetStream) jobs need (env LLMBUS_DURABLE)",
    )
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
    add_arguments(status, ("nats_url", "subject_prefix", *CONNECTION_FIELDS))
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
        "--subject-prefix",
        default=env_default("subject_prefix", DEFAULT_PREFIX),
        help="with --asyncapi: the workers' subject prefix (env LLMBUS_SUBJECT_PREFIX; default llm)",
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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_default(name: str, default: str | bool) -> str | bool:
    """An option's default: `LLMBUS_<NAME>` where set (not empty), else `default`. A string default goes through the
    option's `type` when the option is not given, so a bad value is a usage error that names the variable."""
    return env_value(os.environ, name) or default


def env_bool(variable: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        try:
            return parse_bool(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{variable}={raw!r}: {exc}") from None

    return parse


class EnvFlag(argparse.Action):
    """`--name` and `--no-name`, whose default may be the raw value of LLMBUS_<NAME> (parsed as Config parses it)."""

    def __init__(self, option_strings: list[str], dest: str, default: str | bool = False, **kwargs: Any) -> None:
        negated = [f"--no-{option[2:]}" for option in option_strings if option.startswith("--")]
        kwargs["type"] = env_bool(f"{ENV_PREFIX}{dest.upper()}")
        super().__init__([*option_strings, *negated], dest, nargs=0, default=default, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, not str(option).startswith("--no-"))


def add_logging_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default=(env_value(os.environ, "log_level") or "INFO").upper(),
        choices=LOG_LEVELS,
        help="log level of the stderr log (env LLMBUS_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=(env_value(os.environ, "log_format") or "text").lower(),
        choices=FORMATS,
        help="text, or json: one JSON object per line, for log shippers (env LLMBUS_LOG_FORMAT; default text)",
    )
