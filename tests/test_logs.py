"""Logs: one structured INFO line per answered request (never the prompt), JSON lines for shippers, and prompts at
DEBUG only with --log-prompts. A real tiny-model worker on a real nats-server."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient
from helpers.tiny_model import tiny_model
from helpers.workers import start_worker
from inference_worker.model_loader import LoadedModel
from llmbus import logs
from llmbus.cli_parser import build_parser
from llmbus.config import Config
from llmbus.nats_server import NatsServer
from schemas import ChatRequest, Subjects

SECRET = "my-secret-prompt-marker"
prefixes = (f"logs{n}" for n in itertools.count())


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.allow_prompts(False)


async def bus_to_worker(nats_server: NatsServer, tiny: LoadedModel, **settings: object) -> AsyncIterator[BusClient]:
    prefix = next(prefixes)
    config = Config(nats_url=nats_server.url, subject_prefix=prefix, max_seq_len=128, **settings)  # type: ignore[arg-type]
    worker = await start_worker(config, tiny)
    bus = await BusClient.connect(nats_server.url, subjects=Subjects(prefix))
    try:
        yield bus
    finally:
        await bus.close()
        await worker.shutdown()


@pytest.fixture
async def bus(nats_server: NatsServer, tiny: LoadedModel) -> AsyncIterator[BusClient]:
    async for client in bus_to_worker(nats_server, tiny):
        yield client


@pytest.fixture
async def prompts_bus(nats_server: NatsServer, tiny: LoadedModel, restore_logging: None) -> AsyncIterator[BusClient]:
    async for client in bus_to_worker(nats_server, tiny, log_prompts=True):
        yield client


def request_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "llmbus.requests"]


async def test_one_line_per_request_with_its_figures_and_never_the_prompt(
    bus: BusClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # even at DEBUG, no prompt without --log-prompts
    answer = await bus.chat(ChatRequest(chat_id="a", user_prompt=f"{SECRET} one", max_tokens=4), request_id="req-a")
    async for chunk in bus.stream(
        ChatRequest(chat_id="b", user_prompt=f"{SECRET} two", max_tokens=3), request_id="req-b"
    ):
        last = chunk
    with pytest.raises(BusError) as too_long:
        await bus.chat(ChatRequest(chat_id="c", user_prompt=f"{SECRET} " * 100, max_tokens=4), request_id="req-c")
    assert too_long.value.name == "context_length_exceeded"

    lines = {record.llmbus_fields["request_id"]: record for record in request_records(caplog)}
    assert sorted(lines) == ["req-a", "req-b", "req-c"]
    a = lines["req-a"].llmbus_fields
    assert a["model"] == "tiny" and a["code"] == 200 and a["finish_reason"] == "length"
    assert (a["prompt_tokens"], a["completion_tokens"]) == (answer.usage.prompt_tokens, answer.usage.completion_tokens)
    assert 0 < a["ttft_s"] <= a["total_s"]
    assert lines["req-b"].llmbus_fields["completion_tokens"] == last.usage.completion_tokens
    c = lines["req-c"].llmbus_fields
    assert c["code"] == 400 and c["finish_reason"] is None and c["completion_tokens"] is None
    assert lines["req-a"].levelno == logging.INFO
    assert lines["req-a"].getMessage().startswith("request id=req-a model=tiny prompt_tokens=")
    assert SECRET not in caplog.text and answer.response not in caplog.text


async def test_log_prompts_logs_prompts_and_text_at_debug(
    prompts_bus: BusClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # --log-prompts shows them whatever the root level
    caplog.handler.setLevel(logging.DEBUG)  # as setup_logging's handler, which has no level of its own
    answer = await prompts_bus.chat(ChatRequest(chat_id="p", user_prompt=SECRET, max_tokens=3), request_id="req-p")
    prompts = [record for record in caplog.records if record.name == "llmbus.prompts"]
    assert [record.levelno for record in prompts] == [logging.DEBUG, logging.DEBUG]
    assert SECRET in prompts[0].getMessage() and prompts[0].getMessage().startswith("prompt id=req-p")
    assert prompts[1].getMessage() == f"completion id=req-p text={json.dumps(answer.response, ensure_ascii=False)}"


def test_json_lines_for_log_shippers(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    logs.setup_logging("INFO", "json")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    line = logs.RequestLine("r1", "m", 37, 8, 0.05612, 0.31234, "stop", 200, trace_id=trace_id)
    logs.request_finished(line)
    logging.getLogger("llmbus.worker").info("worker serving %s", "m")
    logs.prompt("r1", [{"role": "user", "content": SECRET}])
    first, second = (json.loads(text) for text in capsys.readouterr().err.splitlines())
    assert first["level"] == "INFO" and first["logger"] == "llmbus.requests" and first["message"] == "request"
    expected = {"request_id": "r1", "model": "m", "prompt_tokens": 37, "completion_tokens": 8, "ttft_s": 0.0561}
    assert expected.items() <= first.items()
    assert (first["total_s"], first["finish_reason"], first["code"]) == (0.3123, "stop", 200)
    assert first["trace_id"] == trace_id and first["time"].endswith("Z")
    assert second["message"] == "worker serving m"


def test_text_lines_and_the_flags() -> None:
    line = logs.RequestLine("r1", "m", None, None, None, 1.5, None, 504)
    assert (
        line.text()
        == "request id=r1 model=m prompt_tokens=- completion_tokens=- ttft_s=- total_s=1.5 finish_reason=- code=504"
    )
    args = build_parser().parse_args(["worker", "--log-format", "json", "--log-prompts"])
    assert args.log_format == "json" and Config.load(args, env={}).log_prompts is True
    assert Config.load(build_parser().parse_args(["worker"]), env={}).log_prompts is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--log-format", "xml"])
    with pytest.raises(ValueError, match="log format"):
        logs.setup_logging("INFO", "xml")
