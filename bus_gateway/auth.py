"""Optional API keys: `Authorization: Bearer <key>` on the guarded routes when any key is configured."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard


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


def api_key_guard(keys: Sequence[str]) -> list[Guard]:
    """The guards for a router: none when no key is configured."""
    if not keys:
        return []
    allowed = tuple(keys)

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        error = check_api_key(connection.headers.get("authorization"), allowed)
        if error is not None:
            raise error

    return [guard]
