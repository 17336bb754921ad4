"""Settings precedence: defaults < LLMBUS_* environment < command-line flags, through the real `llmbus` parser."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from llmbus.cli import loop_factory, uses_existing_nats
from llmbus.cli_parser import ALL_FIELDS, GATEWAY_FIELDS, STACK_ONLY_FIELDS, WORKER_FIELDS, build_parser
from llmbus.config import Config


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_defaults_apply_when_nothing_is_set() -> None:
    config = Config.load(parse("up"), env={})
    assert config == Config()
    assert (config.nats_url, config.http_host, config.http_port, config.nats_port) == (
        "nats://127.0.0.1:4222",
        "127.0.0.1",
        8000,
        4222,
    )


def test_environment_overrides_defaults_with_typed_values() -> None:
    env = {
        "LLMBUS_HTTP_PORT": "9001",
        "LLMBUS_MAX_WAIT_MS": "2.5",
        "LLMBUS_DURABLE": "true",
        "LLMBUS_API_KEYS": "key-a, key-b,",
        "LLMBUS_MODEL": "/models/smollm2",
        "LLMBUS_NATS_URL": "nats://127.0.0.1:5001,nats://127.0.0.1:5002",
    }
    config = Config.load(parse("up"), env=env)
    assert config.http_port == 9001
    assert config.max_wait_ms == 2.5
    assert config.durable is True
    assert config.api_keys == ["key-a", "key-b"]
    assert config.model == "/models/smollm2"
    assert config.nats_url == "nats://127.0.0.1:5001,nats://127.0.0.1:5002"


def test_flags_override_the_environment() -> None:
    env = {"LLMBUS_HTTP_PORT": "9001", "LLMBUS_MAX_BATCH_SIZE": "8", "LLMBUS_DURABLE": "1", "LLMBUS_API_KEYS": "env"}
    args = parse("up", "--http-port", "9002", "--max-batch-size", "4", "--no-durable", "--api-keys", "cli")
    config = Config.load(args, env=env)
    assert (config.http_port, config.max_batch_size, config.durable, config.api_keys) == (9002, 4, False, ["cli"])


def test_unset_flags_leave_the_environment_in_charge() -> None:
    env = {"LLMBUS_HTTP_PORT": "9001", "LLMBUS_DRAIN_TIMEOUT": "5"}
    config = Config.load(parse("gateway", "--request-timeout", "30"), env=env)
    assert (config.http_port, config.request_timeout) == (9001, 30.0)
    assert Config.load(parse("worker"), env=env).drain_timeout == 5.0


def test_list_flags_repeat() -> None:
    config = Config.load(parse("gateway", "--api-keys", "a", "--api-keys", "b"), env={})
    assert config.api_keys == ["a", "b"]


def test_keyword_overrides_win_over_flags() -> None:
    config = Config.load(parse("up", "--nats-url", "nats://127.0.0.1:1"), env={}, nats_url="nats://127.0.0.1:2")
    assert config.nats_url == "nats://127.0.0.1:2"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("off", False),
        ("", False),
    ],
)
def test_boolean_environment_values(raw: str, expected: bool) -> None:
    assert Config.load(env={"LLMBUS_DURABLE": raw}).durable is expected


def test_a_bad_value_is_an_error() -> None:
    with pytest.raises(ValueError):
        Config.load(env={"LLMBUS_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError):
        Config.load(env={"LLMBUS_MAX_BATCH_SIZE": "0"})
    with pytest.raises(SystemExit):
        parse("up", "--http-port", "eighty")


def test_a_bad_environment_value_names_its_variable_and_ports_are_checked() -> None:
    with pytest.raises(ValueError, match="LLMBUS_HTTP_PORT='80O0'"):
        Config.load(env={"LLMBUS_HTTP_PORT": "80O0"})
    for name in ("http_port", "nats_port", "metrics_port"):
        with pytest.raises(ValueError, match=f"{name} must be 0-65535, got 80000"):
            Config(**{name: 80000})
    for prefix in ("a b", "llm.*", "llm.", ""):
        with pytest.raises(ValueError, match="subject_prefix must be NATS subject tokens"):
            Config(subject_prefix=prefix)
    assert Config(subject_prefix="team-a.llm").subject_prefix == "team-a.llm"


def test_each_command_takes_only_its_own_flags() -> None:
    assert set(ALL_FIELDS) == set(WORKER_FIELDS) | set(GATEWAY_FIELDS) | set(STACK_ONLY_FIELDS)
    assert {"model", "max_batch_size", "drain_timeout"} <= set(WORKER_FIELDS) - set(GATEWAY_FIELDS)
    assert {"http_port", "api_keys", "request_timeout"} <= set(GATEWAY_FIELDS) - set(WORKER_FIELDS)
    assert {"nats_url", "subject_prefix", "queue_group"} <= set(WORKER_FIELDS) & set(GATEWAY_FIELDS)
    with pytest.raises(SystemExit):
        parse("gateway", "--model", "/models/x")
    with pytest.raises(SystemExit):
        parse("worker", "--http-port", "8001")


def test_up_starts_its_own_nats_unless_given_a_url() -> None:
    assert uses_existing_nats(parse("up"), env={}) is False
    assert uses_existing_nats(parse("up", "--nats-url", "nats://127.0.0.1:4333"), env={}) is True
    assert uses_existing_nats(parse("up"), env={"LLMBUS_NATS_URL": "nats://127.0.0.1:4333"}) is True
    assert uses_existing_nats(parse("up", "--nats-port", "4333"), env={}) is False
    assert uses_existing_nats(parse("up"), env={"LLMBUS_NATS_URL": ""}) is False  # empty: unset, as for every setting


def test_every_serving_command_picks_its_event_loop() -> None:
    assert {"event_loop"} <= set(WORKER_FIELDS) & set(GATEWAY_FIELDS)
    assert parse("gateway", "--event-loop", "asyncio").event_loop == "asyncio"
    assert Config.load(env={}).event_loop == "uvloop"
    with pytest.raises(ValueError, match="event_loop must be uvloop or asyncio"):
        Config.load(env={"LLMBUS_EVENT_LOOP": "trio"})


def test_prefill_matmuls_is_float32_unless_asked_and_a_bad_value_is_named() -> None:
    assert Config().prefill_matmuls == "float32"
    assert parse("worker", "--prefill-matmuls", "bf16").prefill_matmuls == "bf16"
    assert Config.load(env={"LLMBUS_PREFILL_MATMULS": "bf16"}).prefill_matmuls == "bf16"
    with pytest.raises(ValueError, match="prefill_matmuls must be float32 or bf16, got 'fp8'"):
        Config(prefill_matmuls="fp8")


def test_the_worker_takes_every_quantize_mode_and_names_the_modes_when_refusing_one() -> None:
    assert parse("worker", "--quantize", "int4").quantize == "int4"
    assert Config.load(env={"LLMBUS_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(ValueError, match="quantize must be none, int8 or int4, got 'int3'"):
        Config.load(env={"LLMBUS_QUANTIZE": "int3"})


def test_the_uvloop_setting_runs_a_uvloop_loop_and_asyncio_the_standard_one() -> None:
    uvloop = pytest.importorskip("uvloop")
    factory = loop_factory("uvloop")
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
    assert loop_factory("asyncio") is None
