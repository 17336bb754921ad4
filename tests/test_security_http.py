"""The bridge's own defences: HTTPS with a given certificate, a requests-per-minute limit per API key (429 with
Retry-After), and CORS only for configured origins. On `lonely_nats` (no worker: a chat that passes every check is
a quick 503), so no model is needed."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from bus_gateway.app import https_options
from bus_gateway.auth import RateLimiter
from helpers.bridge import running_bridge
from llmbus.config import Config
from llmbus.nats_server import NatsServer

CHAT = {"chat_id": "c", "user_prompt": "Hi", "max_tokens": 4}
OPENAI_CHAT = {"model": "any", "messages": [{"role": "user", "content": "Hi"}]}
APP_ORIGIN = "https://app.example.test"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- HTTPS -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("https")
    cert, key = directory / "bridge.pem", directory / "bridge.key"
    leaf.private_key_pem.write_to_path(key)
    with cert.open("wb") as f:
        for pem in leaf.cert_chain_pems:
            f.write(pem.bytes())
    return ca, cert, key


async def test_the_bridge_serves_https_that_verifies_against_its_ca(
    lonely_nats: NatsServer, http_ca: tuple[trustme.CA, Path, Path]
) -> None:
    ca, cert, key = http_ca
    config = Config(nats_url=lonely_nats.url, http_tls_cert=str(cert), http_tls_key=str(key), request_timeout=5.0)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with running_bridge(config) as bridge:
        base = f"https://127.0.0.1:{bridge.config.http_port}"
        async with httpx.AsyncClient(verify=trusting, trust_env=False, timeout=30) as https:
            health = await https.get(f"{base}/healthz")
            chat = await https.post(f"{base}/chat", json=CHAT)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert chat.status_code == 503  # through TLS to the bus: no worker there
        async with httpx.AsyncClient(trust_env=False, timeout=30) as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(f"{base}/healthz")
        async with httpx.AsyncClient(trust_env=False, timeout=30) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{bridge.config.http_port}/healthz")


def test_a_bad_https_certificate_is_a_clear_error_at_start(tmp_path: Path) -> None:
    missing = Config(http_tls_cert=str(tmp_path / "none.pem"), http_tls_key=str(tmp_path / "none.key"))
    with pytest.raises(RuntimeError, match="cannot load the HTTPS certificate and key"):
        https_options(missing)
    with pytest.raises(ValueError, match="both http_tls_cert and http_tls_key"):
        Config(http_tls_cert="bridge.pem")


# --- rate limit --------------------------------------------------------------------------------------------------


async def test_each_api_key_gets_its_own_requests_per_minute(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, api_keys=["key-a", "key-b"], rate_limit_per_minute=3, request_timeout=5)
    async with running_bridge(config) as bridge, bridge.client(trust_env=False) as http:
        first = [await http.post("/chat", json=CHAT, headers=bearer("key-a")) for _ in range(3)]
        limited = await http.post("/chat", json=CHAT, headers=bearer("key-a"))
        limited_openai = await http.post("/v1/chat/completions", json=OPENAI_CHAT, headers=bearer("key-a"))
        other_key = await http.post("/chat", json=CHAT, headers=bearer("key-b"))
        wrong_key = await http.post("/chat", json=CHAT, headers=bearer("key-c"))
        health = [await http.get("/healthz") for _ in range(5)]
    assert [r.status_code for r in first] == [503, 503, 503]  # allowed through to the bus (no worker there)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 20
    assert limited.json() == {"error": limited.json()["error"], "code": 429}
    assert "3 requests per minute" in limited.json()["error"]
    assert limited_openai.status_code == 429 and "Retry-After" in limited_openai.headers
    assert limited_openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert other_key.status_code == 503
    assert wrong_key.status_code == 401  # the key check comes first: a wrong key spends nobody's budget
    assert all(r.status_code == 200 for r in health)


async def test_without_api_keys_the_limit_is_per_client_address(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, rate_limit_per_minute=2, request_timeout=5)
    async with running_bridge(config) as bridge, bridge.client(trust_env=False) as http:
        codes = [(await http.post("/chat", json=CHAT)).status_code for _ in range(3)]
    assert codes == [503, 503, 429]


def test_the_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=6, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(6)] == [None] * 6
    assert limiter.take("k") == pytest.approx(10.0)
    now[0] = 9.0
    assert limiter.take("k") == pytest.approx(1.0)
    now[0] = 10.0
    assert limiter.take("k") is None
    assert limiter.take("other") is None


def test_the_token_bucket_forgets_idle_keys() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, clock=lambda: now[0], max_keys=100)
    for i in range(100):
        limiter.take(f"k{i}")
    now[0] = 60.0  # every bucket is full again
    limiter.take("new")
    assert len(limiter._buckets) == 1


# --- CORS --------------------------------------------------------------------------------------------------------


async def preflight(http: httpx.AsyncClient, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return await http.options("/chat", headers=headers)


async def test_cors_is_off_by_default(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, request_timeout=5)
    async with running_bridge(config) as bridge, bridge.client(trust_env=False) as http:
        answer = await http.post("/chat", json=CHAT, headers={"Origin": APP_ORIGIN})
        asked = await preflight(http, APP_ORIGIN)
    assert "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in asked.headers


async def test_cors_allows_only_the_configured_origins(lonely_nats: NatsServer) -> None:
    config = Config(nats_url=lonely_nats.url, cors_origins=[APP_ORIGIN], request_timeout=5)
    async with running_bridge(config) as bridge, bridge.client(trust_env=False) as http:
        allowed = await preflight(http, APP_ORIGIN)
        answer = await http.post("/chat", json=CHAT, headers={"Origin": APP_ORIGIN})
        other = await preflight(http, "https://evil.example.test")
        other_answer = await http.post("/chat", json=CHAT, headers={"Origin": "https://evil.example.test"})
    assert allowed.status_code in (200, 204)
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert other.headers.get("access-control-allow-origin") != "https://evil.example.test"
    assert "access-control-allow-origin" not in other_answer.headers
