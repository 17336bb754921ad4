"""The HTTP side of the load: streaming `POST {url}/v1/chat/completions` (OpenAI SSE) with aiohttp, for llmbus's
own bridge (`--http`) and for any OpenAI-compatible peer server (`--peer-url`: llama.cpp, vLLM, transformers
serve). The request is the bench's workload: the same prompt as one user message, `max_tokens`, temperature 0,
`stream: true` and `stream_options.include_usage`. TTFT is the first content delta, ITL the gaps between content
deltas; completion tokens come from the final usage chunk, or from the count of content deltas when the server
sends none. `--request-timeout` is an idle timeout (the wait for the response, then for each next read), as on
the NATS side, never a deadline on the whole stream.

Why aiohttp, and the event stream split by hand: the load generator shares the machine's cores with the stack it
measures, so what it spends per chunk is taken from the workers. At 64 clients on 2 cores, httpx's pure-Python
HTTP/1.1 parser and line iterator took 1.6 CPU-seconds per point against 0.5 for the NATS clients, and the
workers' steps ran slower by about as much; aiohttp's C parser with `SseSplitter` takes 0.5, like the NATS side,
so `http_over_nats` measures the bridge and not the bench."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from bus_gateway.idle_watch import EARLY_S
from llmbus.bench.stats import RequestRecord
from llmbus.bench.workload import chat_turns

CHAT_PATH = "/v1/chat/completions"
ERROR_BODY_LIMIT = 300


@dataclass(slots=True)
class OpenAITarget:
    """Where one HTTP target lives. `api_key` never leaves this object (not in the JSON, not in the log)."""

    label: str
    base_url: str
    model: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": chat_turns(prompt),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def http_client(concurrency: int) -> aiohttp.ClientSession:
    """One pooled session for every simulated user; no proxy, so the figures are the server's own. Each request
    has its own timeout (`stream_over_http`)."""
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=10.0))


class SseSplitter:
    """Splits a raw `text/event-stream` body into its events' `data:` payloads, across reads. Done by hand on the
    raw bytes, so the load generator spends less of the shared cores per chunk than httpx's line iterator does."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, received: bytes) -> list[bytes]:
        text = self.pending + received
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        *events, self.pending = text.split(b"\n\n")
        payloads = (_data(event) for event in events)
        return [data for data in payloads if data is not None]


def _data(event: bytes) -> bytes | None:
    """An event's data lines, joined by newlines as SSE says; None for an event without one (a comment)."""
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def apply_event(record: RequestRecord, data: bytes, now: float) -> bool:
    """Fold one SSE `data:` payload into the record; True at the end of the stream (`[DONE]` or an error)."""
    if data == b"[DONE]":
        record.end = record.end or now
        return True
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        record.error = f"not JSON in the event stream: {data[:80]!r}"
        return True
    if not isinstance(event, dict):
        return False
    if "error" in event:
        error = event["error"]
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)[:ERROR_BODY_LIMIT]
        return True
    choices = event.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        record.error = f"`choices` is not a list of objects in the event stream: {data[:80]!r}"
        return True
    for choice in choices:
        delta = choice.get("delta") or {}
        record.arrived(now, delta.get("content") if isinstance(delta, dict) else None)
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])
            record.end = now
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        record.usage_tokens = usage["completion_tokens"]
        record.end = now
    return False


async def stream_over_http(
    client: aiohttp.ClientSession, target: OpenAITarget, prompt: str, max_tokens: int, timeout: float
) -> RequestRecord:
    """One streaming chat completion, timed as its SSE events arrive. `timeout` is an idle timeout, as on the NATS
    side (`BusClient.stream`): it bounds the wait for the response's first bytes (connection and headers included)
    and then for each next read of the body, never the whole stream, so a long answer that keeps streaming is
    never cut."""
    record = RequestRecord(sent=time.perf_counter())
    try:
        async with asyncio.timeout(None) as expires:
            idle = IdleDeadline(expires, timeout)
            try:
                await _stream(client, target, prompt, max_tokens, record, idle)
            finally:
                idle.stop()
    except aiohttp.ClientError as exc:  # first: aiohttp's connect timeout is a TimeoutError too
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_LIMIT]
    except TimeoutError:
        record.error = f"nothing from the server for {timeout:g}s (idle timeout)"
    if record.error is None and record.end is None:
        record.error = "the event stream ended without a finish_reason or [DONE]"
    return record


class IdleDeadline:
    """Expires `timeout` (an `asyncio.timeout(None)`) once nothing has arrived for `seconds`. Moving the timeout on
    every chunk cost a loop timer per chunk (about 10 us of the shared cores, as on the NATS side before
    `bus_gateway.idle_watch`); here a chunk only notes its time, and one timer, due `seconds` after the last
    arrival it knows of, looks again when it fires."""

    def __init__(self, timeout: asyncio.Timeout, seconds: float) -> None:
        self.timeout = timeout
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.timer = self.loop.call_at(self.last + seconds, self._check)

    def arrived(self) -> None:
        self.last = self.loop.time()

    def stop(self) -> None:
        self.timer.cancel()

    def _check(self) -> None:
        due = self.last + self.seconds
        if due - self.loop.time() > EARLY_S:
            self.timer = self.loop.call_at(due, self._check)
        else:
            self.timeout.reschedule(self.loop.time())  # expires now: the stream's task gets TimeoutError


async def _stream(
    client: aiohttp.ClientSession,
    target: OpenAITarget,
    prompt: str,
    max_tokens: int,
    record: RequestRecord,
    idle: IdleDeadline,
) -> None:
    url = target.base_url + CHAT_PATH
    response = await post_on_a_live_connection(client, url, target.body(prompt, max_tokens), target.headers())
    async with response:
        idle.arrived()
        if response.status != 200:
            text = (await response.read()).decode(errors="replace")
            record.error = f"HTTP {response.status}: {text[:ERROR_BODY_LIMIT]}"
            return
        splitter = SseSplitter()
        async for received in response.content.iter_any():
            now = time.perf_counter()
            idle.arrived()
            for data in splitter.feed(received):
                if apply_event(record, data, now):
                    return


async def post_on_a_live_connection(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """POST, and again when the pooled connection it went out on fails before any answer: a server may close a
    kept-alive connection without saying so (llama.cpp's `llama-server` did after every streamed answer, and every
    other request of a 1-client point then failed with "Can not write request body"). aiohttp sends a request
    again only when its method is idempotent; a chat completion changes nothing on the server, and the failed try
    got no answer. A failed connection leaves the pool, so the tries are bounded by the pool's size (at 64 clients
    one request met 4 dropped connections in a row). A connection that cannot be opened is not retried. The
    retries' time counts in the request's TTFT, which starts at the first try."""
    dropped = 0
    while True:
        try:
            return await client.post(url, json=body, headers=headers)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            dropped += 1
            if dropped > client.connector.limit:
                raise


async def probe(target: OpenAITarget, timeout: float) -> str | None:
    """One short request, so a wrong URL, model or key fails before the long phases; the problem, or None."""
    async with http_client(1) as client:
        record = await stream_over_http(client, target, "Say hello.", 4, timeout)
    if record.error:
        return f"{target.label} at {target.base_url}: {record.error}"
    return None


async def wait_until_ready(url: str, alive: Any, timeout: float) -> None:
    """Poll the bridge's `GET /readyz` until it answers 200 (it listens and a worker answers); `alive()` raises
    when the bridge process has died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with http_client(1) as client:
        while time.monotonic() < deadline:
            alive()
            try:
                async with client.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the HTTP bridge at {url} was not ready after {timeout:.0f}s ({last})")
