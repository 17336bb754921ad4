"""Which reply subjects a worker answers on: a literal subject under one of its reply prefixes (default `_INBOX.`).

Any other (`$JS.API.STREAM.DELETE.<stream>`, `llm.chat`...) is dropped unanswered. The server cannot enforce this: a
worker's `allow_responses` lets it publish to whatever reply subject a request names. Core requests (`micro`) and
durable jobs (`job_consumer`) go through the same gate.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable

from schemas.errors import clean_text

log = logging.getLogger("llmbus.micro")

REPLY_SUBJECT = re.compile(r"[^\s.*>\x00-\x1f\x7f]+(\.[^\s.*>\x00-\x1f\x7f]+)*")  # literal: no wildcard, no space
MAX_REPLY_SUBJECT = 255


def reply_allowed(reply: str, prefixes: tuple[str, ...]) -> bool:
    """Whether an answer may go to `reply`: a literal subject (no wildcard, whitespace or empty token) under one of
    `prefixes`, never `$JS.API...`, `llm.chat` or another service's subject."""
    return len(reply) <= MAX_REPLY_SUBJECT and bool(REPLY_SUBJECT.fullmatch(reply)) and reply.startswith(prefixes)


class ReplyGate:
    """The reply subjects a worker answers (`reply_allowed`), and what it refused: counted in `refused`, and logged
    (sanitized) at most once per `LOG_EVERY_S`, with the number refused since, so that a flood of them cannot flood
    the log."""

    LOG_EVERY_S = 10.0

    def __init__(self, prefixes: tuple[str, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.prefixes = tuple(prefixes)
        self.clock = clock
        self.refused = 0
        self._unlogged = 0
        self._next_log = -math.inf

    def allows(self, reply: str, what: str) -> bool:
        """Whether to answer on `reply`; `what` names the request for the log (it is sanitized here)."""
        if reply_allowed(reply, self.prefixes):
            return True
        self.refused += 1
        if (now := self.clock()) < self._next_log:
            self._unlogged += 1
            return False
        since = f" ({self._unlogged} more refused since the last warning)" if self._unlogged else ""
        log.warning(
            "dropped %s: its reply subject '%s' is not under a reply prefix (%s); nothing was published%s",
            clean_text(what, 160),
            clean_text(reply, 160),
            ", ".join(self.prefixes),
            since,
        )
        self._next_log, self._unlogged = now + self.LOG_EVERY_S, 0
        return False
