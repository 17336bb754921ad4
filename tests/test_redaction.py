"""A password or token in a NATS URL is never printed, whatever characters it holds: `urlsplit` ends a URL's
authority at the first `/`, `?` or `#`, so a password holding one used to be printed in full. nats-py cannot read
such a URL either (nor does it decode %-escapes), so the settings check says where such a secret goes instead."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from llmbus.config import Config
from llmbus.connection import ConnectionSettingsError, check_settings
from llmbus.nats_server import NatsServer, env_without_proxy, write_config
from llmbus.urls import redact_url, redact_urls

SECRET_URLS = [
    ("nats://alice:s3/cret@127.0.0.1:4222", "nats://alice:***@127.0.0.1:4222", "s3/cret"),
    ("nats://u:ab?cd@h", "nats://u:***@h", "ab?cd"),
    ("nats://u:ab#cd@h", "nats://u:***@h", "ab#cd"),
    ("tls://tok/en+x=@h:4222", "tls://***@h:4222", "tok/en+x="),  # a token
    ("u:a/b@h:4222", "u:***@h:4222", "a/b"),  # nats-py's scheme-less form
    ("wss://u:a/b?c@h:443/ws", "wss://u:***@h:443/ws", "a/b?c"),
]


@pytest.mark.parametrize(("url", "shown", "secret"), SECRET_URLS)
def test_a_password_or_token_is_never_shown_whatever_it_holds(url: str, shown: str, secret: str) -> None:
    assert redact_url(url) == shown
    assert redact_urls(url) == shown
    assert secret not in redact_urls(url)


def test_every_url_of_a_list_is_redacted_and_a_url_without_credentials_left_alone() -> None:
    listed = "nats://a:b/c@h1:4222,nats://d:e?f@h2:4222, tls://tok#en@h3:4222"
    assert redact_urls(listed) == "nats://a:***@h1:4222,nats://d:***@h2:4222,tls://***@h3:4222"
    assert redact_urls("u:p/q@h1:4222,v:r#s@h2:4222") == "u:***@h1:4222,v:***@h2:4222"
    assert redact_urls("nats://u:a,b@h:4222,nats://h2:4222") == "nats://u:***@h:4222,nats://h2:4222"  # a comma in it
    for plain in ("nats://h:4222", "tls://nats.example:4222/", "h:4222", "nats://[::1]:4222", "ws://h:80/p?x=1#y"):
        assert redact_urls(plain) == plain  # no credentials: left as it is
    assert redact_url("nats://u:p@ss@h:4222") == "nats://u:***@h:4222"  # the last `@` ends the login, as in nats-py


@pytest.mark.parametrize(("url", "shown", "secret"), SECRET_URLS)
def test_a_url_login_nats_py_cannot_read_is_named_with_where_it_goes_instead(url: str, shown: str, secret: str) -> None:
    with pytest.raises(ConnectionSettingsError) as caught:
        check_settings(Config(nats_url=url))
    message = str(caught.value)
    assert shown in message and secret not in message
    assert "%-escapes are not decoded" in message and "--nats-password" in message and "--nats-token" in message


async def llmbus(*args: str) -> tuple[int, str, str]:
    """`llmbus ARGS` as a user runs it, with no LLMBUS_* setting from this environment."""
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith("LLMBUS_")}
    pipe = asyncio.subprocess.PIPE
    command = [sys.executable, "-m", "llmbus.cli", *args]
    proc = await asyncio.create_subprocess_exec(*command, stdout=pipe, stderr=pipe, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_status_never_prints_a_url_password_with_a_slash(tmp_path: Path) -> None:
    """The reviewer's case: `llmbus status --nats-url nats://alice:s3/cret@...` printed the password. It now names
    the URL redacted and says to give the password apart; given apart, the same login works."""
    users = [{"user": "alice", "password": "s3/cret"}]
    config_file = write_config(tmp_path / "nats.conf", {"authorization": {"users": users}})
    with NatsServer(config_file=config_file, jetstream=False) as server:
        code, out, err = await llmbus("status", "--nats-url", f"nats://alice:s3/cret@127.0.0.1:{server.port}")
        assert code == 1
        assert "s3/cret" not in out + err and "cret" not in out + err
        assert f"cannot read the bus at nats://alice:***@127.0.0.1:{server.port}: " in err
        assert "--nats-password" in err
        args = ("--nats-url", server.url, "--nats-user", "alice", "--nats-password", "s3/cret")
        code, out, err = await llmbus("status", *args)
        assert (code, "no worker answers $SRV.STATS" in out) == (1, True), err  # logged in: an empty bus
