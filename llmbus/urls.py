"""NATS server URLs: a list of them split into servers, and each fit for logs with its password or token hidden
(`nats://user:***@host:4222`). Not `urlsplit` for the login: it ends the authority at the first `/`, `?` or `#`, so
a password holding one would read as a host or a path, and show."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")  # a comma that starts another URL with a scheme
URL_ENDS = "/?#"  # where a URL's authority ends: a password or token holding one of them cannot be read
UNPARSEABLE = "<unparseable URL>"


def servers_of(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


def split_login(url: str) -> tuple[str, str, str]:
    """`scheme://` ("" when none), the login (all before the last `@`) and the rest. Not `urlsplit`: it ends the
    authority at the first `/`, `?` or `#`, so a password holding one would read as a host or a path, and show."""
    scheme = match.group(0) if (match := SCHEME.match(url)) else ""
    login, at, rest = url[len(scheme) :].rpartition("@")
    return scheme, login if at else "", rest


def redact_url(url: str) -> str:
    """A server URL fit for logs: `nats://user:***@host:4222`, `tls://***@host:4222` for a token."""
    scheme, login, rest = split_login(url)
    if "@" in url[len(scheme) :]:  # a user name is kept, a password or token never
        user, colon, _ = login.partition(":")
        url = f"{scheme}{user}:***@{rest}" if colon else f"{scheme}***@{rest}"
    try:
        urlsplit(url if scheme else f"nats://{url}")
    except ValueError:  # such as an unclosed IPv6 bracket
        return UNPARSEABLE
    return url


def redact_urls(url: str) -> str:
    """Each URL of a list redacted; URLs with schemes are cut before each scheme, so a password's comma stays in."""
    if SCHEME.search(url):
        return ",".join(redact_url(server.strip()) for server in NEXT_URL.split(url) if server.strip())
    return ",".join(redact_url(server) for server in servers_of(url))
