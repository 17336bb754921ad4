"""The web page's routes over real sockets: the page and its files come from the package with no CDN and stay
small, `/docs` is the bundled viewer, and `/bus.json` reports the workers (with the real SmolLM2 worker: tokens/s
over the interval matches the tokens a chat generated). The browser flows are in test_web.py."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from bus_gateway import web
from bus_gateway.web import STATIC_DIR
from helpers.bridge import API_KEY, running_bridge
from llmbus.config import Config
from llmbus.connection import flushed
from llmbus.nats_server import NatsServer

pytestmark = pytest.mark.timeout(120)

ASSET_BUDGET_BYTES = 200_000
ROOT = Path(__file__).resolve().parent.parent


def assets() -> list[Path]:
    return sorted(path for path in STATIC_DIR.rglob("*") if path.is_file())


def test_assets_stay_under_the_budget() -> None:
    total = sum(path.stat().st_size for path in assets())
    assert {path.name for path in assets()} >= {"index.html", "style.css", "app.js", "chat.js", "docs.html"}
    assert total < ASSET_BUDGET_BYTES, f"{total} bytes of web assets"


def test_assets_load_nothing_from_elsewhere_and_never_write_html() -> None:
    for path in assets():
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} names an outside URL"
        assert not re.search(r"\bsrc=\"//|\bhref=\"//", text), f"{path.name} loads a protocol-relative URL"
        if path.suffix == ".js":
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
                assert sink not in text, f"{path.name} uses {sink}: use textContent"


def test_the_assets_ship_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["bus_gateway"]


async def test_the_page_and_its_files_are_served_with_a_strict_policy(lonely_http: httpx.AsyncClient) -> None:
    for path in ("/", "/bus"):
        page = await lonely_http.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"  # once: the framework adds the charset
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.text == (STATIC_DIR / "index.html").read_text()
    for name in ("style.css", "app.js", "chat.js", "docs.js"):
        asset = await lonely_http.get(f"/static/{name}")
        assert asset.status_code == 200, name
        assert asset.content == (STATIC_DIR / name).read_bytes()
    assert (await lonely_http.get("/static/../web.py")).status_code == 404
    assert (await lonely_http.get("/static/nothing.js")).status_code == 404


def assert_page_headers(response: httpx.Response) -> None:
    """The page's headers: a strict policy that forbids framing, and no MIME sniffing."""
    policy = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, (response.url, policy)
    assert response.headers.get("x-content-type-options") == "nosniff", response.url


async def test_every_static_file_carries_the_page_headers(lonely_http: httpx.AsyncClient) -> None:
    """The static copies of the pages are pages too: none can be framed, and no file is MIME-sniffed."""
    for path in ("/", "/bus", *(f"/static/{path.name}" for path in assets())):
        response = await lonely_http.get(path)
        assert response.status_code == 200, path
        assert_page_headers(response)


async def test_the_docs_viewer_carries_the_page_headers(lonely_http: httpx.AsyncClient) -> None:
    docs = await lonely_http.get("/docs")
    assert docs.status_code == 200
    assert_page_headers(docs)
    missing = await lonely_http.get("/docs/nothing")  # the viewer's own 404 page is HTML too
    assert missing.status_code == 404
    assert_page_headers(missing)


async def test_docs_is_the_bundled_viewer(lonely_http: httpx.AsyncClient) -> None:
    docs = await lonely_http.get("/docs")
    assert docs.status_code == 200
    assert docs.text == (STATIC_DIR / "docs.html").read_text()
    assert "swagger" not in docs.text.lower()
    document = (await lonely_http.get("/openapi.json")).json()
    assert "/bus.json" in document["paths"]
    assert "/" not in document["paths"] and "/bus" not in document["paths"]


async def test_bus_json_with_no_worker_is_an_empty_bus(lonely_http: httpx.AsyncClient) -> None:
    response = await lonely_http.get("/bus.json")
    assert response.status_code == 200
    body = response.json()
    assert body["workers"] == []
    assert body["totals"]["workers"] == 0
    assert body["totals"]["draining"] is None and body["totals"]["compile_failed"] is None  # unknown, never 0
    assert body["chat_subject"] == "llm.chat"


async def test_bus_json_needs_the_api_key_when_keys_are_set(keyed_bridge) -> None:  # type: ignore[no-untyped-def]
    async with keyed_bridge.client() as client:
        missing = await client.get("/bus.json")
        assert missing.status_code == 401
        assert "missing API key" in missing.json()["error"]
        allowed = await client.get("/bus.json", headers={"Authorization": f"Bearer {API_KEY}"})
        assert allowed.status_code == 200
        assert (await client.get("/")).status_code == 200  # the page itself is open: it asks for the key


@pytest.mark.model
async def test_bus_json_reports_the_worker_and_its_tokens_per_s(worker, http: httpx.AsyncClient, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(web, "FRESH_FOR_S", 0.0)  # every poll a new `$SRV` round, however soon the chat ends
    first = (await http.get("/bus.json")).json()
    [row] = first["workers"]
    assert (row["host"], row["pid"]) == (socket.gethostname(), os.getpid())
    assert (row["model"], row["device"], row["draining"]) == ("SmolLM2-135M-Instruct", "cpu", False)
    assert row["uptime_s"] >= 0
    chat = await http.post("/chat", json={"chat_id": "rate", "user_prompt": "Count to twenty.", "max_tokens": 8})
    generated = chat.json()["usage"]["completion_tokens"]
    second = (await http.get("/bus.json")).json()
    [after] = second["workers"]
    assert after["tokens_generated"] - row["tokens_generated"] == generated
    assert second["interval_s"] > 0
    assert after["tokens_per_s"] == pytest.approx(generated / second["interval_s"], rel=1e-6)
    assert second["totals"]["tokens_per_s"] == after["tokens_per_s"]
    assert after["requests"] == row["requests"] + 1


async def test_bus_json_polls_do_not_spend_the_chat_rate_limit(lonely_nats: NatsServer) -> None:
    """The page polls /bus.json every 1.5 s: with a limit of 3 per minute, polls past it still answer (behind the
    key) and the key's chats keep their own 3."""
    config = Config(nats_url=lonely_nats.url, request_timeout=5.0, api_keys=[API_KEY], rate_limit_per_minute=3)
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"chat_id": "limit", "user_prompt": "Hi", "max_tokens": 1}
    async with running_bridge(config) as bridge, bridge.client() as client:
        assert (await client.get("/bus.json")).status_code == 401
        for _ in range(10):
            assert (await client.get("/bus.json", headers=keyed)).status_code == 200
        chats = [(await client.post("/chat", json=chat, headers=keyed)).status_code for _ in range(4)]
    assert chats[:3] == [503] * 3  # through the limit: no worker on this bus
    assert chats[3] == 429


async def test_polls_of_bus_json_within_a_second_share_one_srv_round(
    lonely_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/bus.json is not rate-limited: a client polling it in a loop must not make every worker answer each poll."""
    rounds: list[str] = []
    config = Config(nats_url=lonely_nats.url, request_timeout=5.0)
    async with running_bridge(config) as bridge, bridge.client() as client:
        nc = await nats.connect(lonely_nats.url)
        try:

            async def counted(msg: Msg) -> None:
                rounds.append(msg.subject)

            await nc.subscribe("$SRV.INFO.>", cb=counted)
            await flushed(nc)
            monkeypatch.setattr(web, "FRESH_FOR_S", 3600.0)
            for _ in range(5):
                assert (await client.get("/bus.json")).status_code == 200
            await flushed(nc)
            assert len(rounds) == 1
            monkeypatch.setattr(web, "FRESH_FOR_S", 0.0)
            assert (await client.get("/bus.json")).status_code == 200
            await flushed(nc)
            assert len(rounds) == 2
        finally:
            await nc.close()
