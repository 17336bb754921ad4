"""LLMBUS_* variables: booleans take 1/true/yes/on and 0/false/no/off and refuse anything else by name, an empty
variable counts as unset, the reply prefixes (and their deprecated durable alias) are read and checked, and
`llmbus nats-permissions` and `llmbus schema` read LLMBUS_SUBJECT_PREFIX, LLMBUS_QUEUE_GROUP and LLMBUS_DURABLE."""

from __future__ import annotations

import json

import pytest

from llmbus import cli
from llmbus.cli import main
from llmbus.cli_parser import build_parser
from llmbus.config import Config

BOOLEANS = ("secure", "compile", "durable", "default_model", "log_prompts")


WORDS = {"1": True, "true": True, "Yes": True, "ON": True, " on ": True, "0": False, "FALSE": False, "no": False}


@pytest.mark.parametrize("name", BOOLEANS)
def test_boolean_variables_take_the_usual_words_and_refuse_any_other_by_name(name: str) -> None:
    """`LLMBUS_SECURE=y` read as False started a plaintext stack with no login; `LLMBUS_DURABLE=y` was ignored."""
    variable = f"LLMBUS_{name.upper()}"
    for raw, expected in WORDS.items():
        assert getattr(Config.load(env={variable: raw}), name) is expected, raw
    for raw in ("y", "n", "enabled", "2", "truee"):
        with pytest.raises(ValueError, match=f"{variable}='{raw}': not a boolean: use 1, true, yes, on or 0, false"):
            Config.load(env={variable: raw})


def test_the_serving_commands_refuse_a_bad_boolean_before_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LLMBUS_SECURE=y` started a plaintext stack with no login."""

    async def no_stack(*args: object, **kwargs: object) -> int:
        raise AssertionError("the stack was started")

    monkeypatch.setattr(cli, "run_stack", no_stack)
    monkeypatch.setattr(cli.process_gc, "pause", lambda: None)
    monkeypatch.setenv("LLMBUS_SECURE", "y")
    assert main(["up"]) == 2
    assert "LLMBUS_SECURE='y': not a boolean" in capsys.readouterr().err


def test_an_empty_variable_counts_as_unset() -> None:
    """`LLMBUS_COMPILE=` turned compilation off, and `LLMBUS_NATS_URL=` made the URL empty."""
    defaults = Config()
    empty = {f"LLMBUS_{name.upper()}": "" for name in (*BOOLEANS, "nats_url", "http_port", "nats_inbox_prefix")}
    config = Config.load(env=empty | {"LLMBUS_MAX_BATCH_SIZE": "  "})
    assert config == defaults
    assert config.compile is True and config.nats_url == "nats://127.0.0.1:4222"


def test_reply_prefixes_come_from_the_environment_or_repeated_flags() -> None:
    assert Config().reply_prefixes == ["_INBOX."]
    assert Config.load(env={"LLMBUS_REPLY_PREFIXES": ""}).reply_prefixes == ["_INBOX."]  # empty: unset
    env = {"LLMBUS_REPLY_PREFIXES": "_INBOX., app.inbox."}
    assert Config.load(env=env).reply_prefixes == ["_INBOX.", "app.inbox."]
    args = build_parser().parse_args(["worker", "--reply-prefixes", "_INBOX.", "--reply-prefixes", "app."])
    assert Config.load(args, env=env).reply_prefixes == ["_INBOX.", "app."]


def test_the_durable_reply_prefixes_still_work_as_a_deprecated_alias(caplog: pytest.LogCaptureFixture) -> None:
    alias = {"LLMBUS_DURABLE_REPLY_PREFIXES": "_INBOX.,jobs.inbox."}
    assert Config.load(env=alias).reply_prefixes == ["_INBOX.", "jobs.inbox."]
    assert "deprecated" in caplog.text
    args = build_parser().parse_args(["worker", "--durable-reply-prefixes", "_INBOX.alice."])
    assert Config.load(args, env={}).reply_prefixes == ["_INBOX.alice."]
    both = alias | {"LLMBUS_REPLY_PREFIXES": "_INBOX."}  # the new setting wins, even set to its default
    assert Config.load(env=both).reply_prefixes == ["_INBOX."]
    assert Config(durable_reply_prefixes=["_INBOX.x."]).reply_prefixes == ["_INBOX.x."]


@pytest.mark.parametrize("prefix", ["$JS.API.", "$SRV.", "_INBOX.*", "_INBOX.>", "_INBOX. x", "", ".", "llm.", "l"])
def test_a_reply_prefix_that_is_no_inbox_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="reply_prefixes"):
        Config(reply_prefixes=[prefix])
    with pytest.raises(ValueError, match="reply_prefixes"):
        Config.load(env={"LLMBUS_DURABLE_REPLY_PREFIXES": f"_INBOX.,{prefix}" if prefix else " , "})


def test_no_reply_prefix_at_all_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one prefix"):
        Config.load(env={"LLMBUS_REPLY_PREFIXES": ","})


# --- nats-permissions and schema ----------------------------------------------------------------------------


def printed_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_nats_permissions_reads_the_subject_prefix_queue_group_and_durable_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBUS_SUBJECT_PREFIX", "team")
    monkeypatch.setenv("LLMBUS_QUEUE_GROUP", "team-workers")
    monkeypatch.setenv("LLMBUS_DURABLE", "yes")
    block = printed_json(capsys, "nats-permissions", "--role", "worker")
    assert "team.chat team-workers" in block["subscribe"]["allow"]
    assert "$JS.API.STREAM.INFO.LLM_JOBS" in block["publish"]["allow"]
    flags = ("--subject-prefix", "llm", "--queue-group", "llm-workers", "--no-durable")
    block = printed_json(capsys, "nats-permissions", "--role", "worker", *flags)  # flags win over the variables
    assert "llm.chat llm-workers" in block["subscribe"]["allow"]
    assert not [s for s in block["publish"]["allow"] if s.startswith("$JS.")]
    monkeypatch.setenv("LLMBUS_DURABLE", "")  # empty: unset
    assert not [
        s for s in printed_json(capsys, "nats-permissions", "--role", "worker")["publish"]["allow"] if "$JS" in s
    ]


def test_nats_permissions_refuses_a_bad_durable_variable_by_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBUS_DURABLE", "y")
    with pytest.raises(SystemExit) as exited:
        main(["nats-permissions", "--role", "worker"])
    assert exited.value.code == 2
    assert "LLMBUS_DURABLE='y': not a boolean" in capsys.readouterr().err
    assert printed_json(capsys, "nats-permissions", "--role", "worker", "--durable")["publish"]["allow"]


def test_schema_reads_the_subject_prefix_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBUS_SUBJECT_PREFIX", "team")
    document = printed_json(capsys, "schema", "--asyncapi")
    addresses = [channel["address"] for channel in document["channels"].values()]
    assert "team.chat" in addresses and "llm.chat" not in addresses
    document = printed_json(capsys, "schema", "--asyncapi", "--subject-prefix", "other")
    assert "other.chat" in [channel["address"] for channel in document["channels"].values()]
