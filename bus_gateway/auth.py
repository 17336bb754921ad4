"""Optional API keys: `Authorization: Bearer <key>` on the guarded routes when any key is configured; and an
optional per-key requests-per-minute limit, so that one key cannot take all the capacity.

The limit is a token bucket per API key (per client address when the bridge has no keys): a key may burst up to
`per_minute` requests, and gets one more every `60 / per_minute` seconds. Past it, a request is refused with 429 and
a `Retry-After` of the seconds until the next one is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from schemas.subjects import TENANT

TENANT_STATE = "llmbus_tenant"


class ApiKeyError(Exception):
    """A request without a valid API key; each API renders it in its own error shape (status 401)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def check_api_key(authorization: str | None, keys: Sequence[str]) -> ApiKeyError | None:
    """None when the header carries one of `keys` (compared in constant time); the reason otherwise."""
    token = bearer_token(authorization)
    if token is None:
        return ApiKeyError("missing API key: send the header `Authorization: Bearer <key>`", "missing_api_key")
    given = token.encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        return ApiKeyError("invalid API key", "invalid_api_key")
    return None


TENANT_SALT = b"llmbus-tenant"
TENANT_HASH_ROUNDS = 50_000


@functools.cache  # once per configured key and process (a few ms); only valid keys get here
def tenant_of_key(key: str) -> str:
    """The tenant an API key's requests count for (`Llmbus-Tenant`, and `$SRV.STATS` `waiting_by_tenant`): a name
    stable across bridges that does not reveal the key. A slow hash (PBKDF2), as anyone who reads bus headers or
    STATS sees it: a plain SHA-256 made it a fast offline test of guesses at a short key."""
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), TENANT_SALT, TENANT_HASH_ROUNDS)
    return "key-" + digest.hex()[:12]


def tenant_headers(connection: ASGIConnection) -> dict[str, str]:
    """The NATS headers that tag a request with its API key's tenant (none without API keys)."""
    tenant = connection.state.get(TENANT_STATE)
    return {TENANT: tenant} if tenant else {}


def api_key_guard(keys: Sequence[str]) -> list[Guard]:
    """The guards for a router: none when no key is configured. A valid key's tenant goes with the request, so a
    worker's admission rotates among API keys (one key's burst cannot hold back another's requests)."""
    if not keys:
        return []
    allowed = tuple(keys)

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        authorization = connection.headers.get("authorization")
        error = check_api_key(authorization, allowed)
        if error is not None:
            raise error
        connection.state[TENANT_STATE] = tenant_of_key(bearer_token(authorization) or "")

    return [guard]


class RateLimited(Exception):
    """A request past its key's limit; the app renders it as 429 with `Retry-After` in each API's error shape."""

    def __init__(self, per_minute: int, retry_after: int) -> None:
        self.per_minute = per_minute
        self.retry_after = retry_after
        self.message = f"rate limit exceeded: {per_minute} requests per minute; retry after {retry_after} s"
        super().__init__(self.message)


@dataclass
class RateLimiter:
    """Token buckets, one per key. `take(key)` spends one request: None when allowed, else the seconds to wait."""

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 10_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, when)

    def take(self, key: str) -> float | None:
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) * 60.0 / self.per_minute

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (float(self.per_minute), now))
        return min(float(self.per_minute), tokens + (now - when) * self.per_minute / 60.0)

    def _forget_full(self, now: float) -> None:
        """A full bucket is the same as none: drop those, so that many one-off clients cannot grow the table."""
        full = [key for key in self._buckets if self._tokens(key, now) >= self.per_minute]
        for key in full:
            del self._buckets[key]


def rate_limit_guard(per_minute: int, keyed: bool, limiter: RateLimiter | None = None) -> list[Guard]:
    """The guards that enforce `per_minute` (none when 0): per API key when `keyed`, else per client address.
    Placed after the API key guard, so only valid keys spend requests."""
    if per_minute <= 0:
        return []
    buckets = limiter or RateLimiter(per_minute)

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if keyed:
            key = "key:" + (bearer_token(connection.headers.get("authorization")) or "")
        else:
            key = "addr:" + (connection.client.host if connection.client else "unknown")
        wait = buckets.take(key)
        if wait is not None:
            raise RateLimited(per_minute, max(1, math.ceil(wait)))

    return [guard]
