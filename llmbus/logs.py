"""Logging for every llmbus part: one stderr handler, as text or as JSON lines (`--log-format json`, for shippers).

The worker writes one INFO line per request it answered, on the `llmbus.requests` logger: request id, model, prompt
and completion tokens, time to first token, total time, finish reason and code (and the trace id when the request
carried a `traceparent`). A request refused before it ran (invalid, a duplicate, overloaded...) gets one too, with
its error code and no tokens; a durable job put back on its queue gets none (the worker that answers it writes it).
Never the prompt:

    2026-11-26 01:30:00,123 INFO llmbus.requests: request id=my-req-1 model=SmolLM2-135M-Instruct prompt_tokens=37
        completion_tokens=8 ttft_s=0.056 total_s=0.312 finish_reason=stop code=200
    {"time": "2026-11-26T01:30:00.123Z", "level": "INFO", "logger": "llmbus.requests", "message": "request",
        "request_id": "my-req-1", "model": "SmolLM2-135M-Instruct", "prompt_tokens": 37, ...}

Prompts and generated text are private: they are logged only with `--log-prompts` (a debugging switch, off by
default), at DEBUG on the `llmbus.prompts` logger, whatever `--log-level` says.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = "llmbus_fields"  # the LogRecord attribute that carries a structured line's fields

requests_log = logging.getLogger("llmbus.requests")
prompts_log = logging.getLogger("llmbus.prompts")
prompts_log.setLevel(logging.CRITICAL + 1)  # off until allow_prompts(True), even under a DEBUG root


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One answered request (or one refused before it ran: no tokens, no finish reason), as logged."""

    request_id: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None
    total_s: float
    finish_reason: str | None
    code: int
    trace_id: str | None = None

    def fields(self) -> dict[str, Any]:
        values = asdict(self)
        for name in ("ttft_s", "total_s"):
            if values[name] is not None:
                values[name] = round(values[name], 4)
        if self.trace_id is None:
            del values["trace_id"]
        return values

    def text(self) -> str:
        values = self.fields()
        values["id"] = values.pop("request_id")
        order = ["id", *(name for name in values if name != "id")]
        return "request " + " ".join(f"{name}={'-' if values[name] is None else values[name]}" for name in order)

    def span_attributes(self) -> dict[str, Any]:
        """The OpenTelemetry attributes of the request's span (GenAI semantic conventions where they exist)."""
        attributes: dict[str, Any] = {
            "gen_ai.request.model": self.model,
            "llmbus.request_id": self.request_id,
            "llmbus.code": self.code,
        }
        if self.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = self.prompt_tokens
        if self.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = self.completion_tokens
        if self.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [self.finish_reason]
        return attributes


def request_finished(line: RequestLine) -> None:
    if requests_log.isEnabledFor(logging.INFO):
        requests_log.info("%s", line.text(), extra={FIELDS: {"message": "request", **line.fields()}})


def prompt(request_id: str, messages: list[dict[str, str]]) -> None:
    """Only with --log-prompts: a request's messages, at DEBUG."""
    if prompts_log.isEnabledFor(logging.DEBUG):
        text = json.dumps(messages, ensure_ascii=False)
        prompts_log.debug("prompt id=%s messages=%s", request_id, text, extra={FIELDS: {"request_id": request_id}})


def completion(request_id: str, text: str) -> None:
    """Only with --log-prompts: the text generated for a request, at DEBUG."""
    if prompts_log.isEnabledFor(logging.DEBUG):
        quoted = json.dumps(text, ensure_ascii=False)
        prompts_log.debug("completion id=%s text=%s", request_id, quoted, extra={FIELDS: {"request_id": request_id}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, a structured line's fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", log_prompts: bool = False) -> None:
    """The process's logging: stderr, `fmt` text or json, at `level`; prompts at DEBUG only with `log_prompts`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    allow_prompts(log_prompts)


def allow_prompts(on: bool) -> None:
    """Let `llmbus.prompts` log at DEBUG (whatever the root level), or silence it."""
    prompts_log.setLevel(logging.DEBUG if on else logging.CRITICAL + 1)
