"""Security settings without a server: `llmbus nats-permissions`, connection settings checked before connecting,
secrets kept out of repr and --help, and the files `llmbus up --secure` generates."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from helpers.nats_auth import make_tls
from llmbus.cli import main
from llmbus.config import Config
from llmbus.connection import ConnectionSettingsError, connect, nats_options, wants_tls
from llmbus.nats_server import NatsServer, nats_server_binary
from llmbus.permissions import ROLES, grants, jwt_permissions, server_permissions
from llmbus.secure_stack import prepare
from llmbus.urls import redact_url

CONNECTION_FLAGS = (
    "--nats-creds",
    "--nats-nkey-seed",
    "--nats-user",
    "--nats-password",
    "--nats-token",
    "--nats-tls-ca",
    "--nats-tls-cert",
    "--nats-tls-key",
    "--nats-inbox-prefix",
)

# --- llmbus nats-permissions -------------------------------------------------------------------------------------


# replies, plus what forwarding to another model, spreading a batch and sharing a host's cores take; nothing else
WORKER_PUBLISH = [
    "llm.chat",
    "llm.model.*.chat",
    "llm.model.*.chat.batched",
    "llm.cancel.*",
    "$SRV.PING.llm-inference",
    "$SRV.INFO.llm-inference",
    "llm.worker.left",
]


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["nats-permissions", *argv]) == 0
    return json.loads(capsys.readouterr().out)


ALICE = ("--inbox-prefix", "_INBOX.alice")  # a client has no default inbox prefix: one per user


def test_the_command_prints_each_roles_block(capsys: pytest.CaptureFixture[str]) -> None:
    for role in ROLES:
        flags, inbox = (ALICE, "_INBOX.alice") if role == "client" else ((), None)
        assert printed(capsys, "--role", role, *flags) == server_permissions(grants(role, inbox_prefix=inbox))
    worker = printed(capsys, "--role", "worker")
    assert worker["allow_responses"] == {"max": -1, "expires": "1h"}
    # replies, plus what spreading a batch over the queue group and sharing a host's cores take; nothing else
    assert worker["publish"] == {"allow": WORKER_PUBLISH}
    assert "llm.chat llm-workers" in worker["subscribe"]["allow"] and "_INBOX.worker.>" in worker["subscribe"]["allow"]
    assert "llm.cancel.*" in worker["subscribe"]["allow"] and "$SRV.PING" in worker["subscribe"]["allow"]
    client = printed(capsys, "--role", "client", "--inbox-prefix", "_INBOX.alice", "--subject-prefix", "ai")
    assert client["subscribe"] == {"allow": ["_INBOX.alice.>"]}
    assert set(client["publish"]["allow"]) == {
        "ai.chat",
        "ai.chat.batched",
        "ai.model.*.chat",
        "ai.model.*.chat.batched",
        "ai.cancel.*",
        "$SRV.PING.llm-inference",
        "$SRV.INFO.llm-inference",
    }
    assert "allow_responses" not in client
    gateway = printed(capsys, "--role", "gateway")
    assert set(gateway["publish"]["allow"]) - set(printed(capsys, "--role", "client", *ALICE)["publish"]["allow"]) == {
        "$SRV.STATS.llm-inference"
    }


def test_durable_adds_the_jetstream_subjects(capsys: pytest.CaptureFixture[str]) -> None:
    worker = printed(capsys, "--role", "worker", "--durable", "--inbox-prefix", "_INBOX.w1")
    assert "$JS.API.CONSUMER.MSG.NEXT.LLM_JOBS.*" in worker["publish"]["allow"]  # every llm-workers[-<model>]
    assert "$JS.ACK.LLM_JOBS.*.>" in worker["publish"]["allow"]
    assert "llm.jobs.model.*.>" in worker["publish"]["allow"]
    assert {"llm.jobs.chat", "llm.jobs.chat.batched"} <= set(worker["publish"]["allow"])  # a job stored again
    assert "_INBOX.>" in worker["publish"]["allow"]
    assert "_INBOX.w1.>" in worker["subscribe"]["allow"]
    client = printed(capsys, "--role", "client", "--durable", *ALICE)
    assert {"llm.jobs.chat", "llm.jobs.chat.batched"} <= set(client["publish"]["allow"])
    assert not [s for s in client["publish"]["allow"] if s.startswith("$JS.API")]  # a JetStream publish is a request


def test_the_jwt_format_uses_the_user_claim_names(capsys: pytest.CaptureFixture[str]) -> None:
    worker = printed(capsys, "--role", "worker", "--format", "jwt")
    assert worker["resp"] == {"max": -1, "ttl": 3_600_000_000_000}
    assert worker["pub"] == {"allow": WORKER_PUBLISH}
    assert "llm.chat llm-workers" in worker["sub"]["allow"]
    alice = grants("client", inbox_prefix="_INBOX.alice")
    assert printed(capsys, "--role", "client", "--format", "jwt", *ALICE) == jwt_permissions(alice)


def test_no_subscribe_allow_list_is_ever_empty() -> None:
    """An empty subscribe allow list would allow every subject."""
    for role in ROLES:
        for durable in (False, True):
            inbox = "_INBOX.alice" if role == "client" else None
            assert server_permissions(grants(role, inbox_prefix=inbox, durable=durable))["subscribe"]["allow"]


@pytest.mark.parametrize(
    "argv",
    [
        ("--role", "client", "--inbox-prefix", "_INBOX.*"),
        ("--role", "client", "--subject-prefix", "llm.>"),
        ("--role", "worker", "--queue-group", "two words"),
    ],
)
def test_wildcards_in_names_are_refused(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    assert main(["nats-permissions", *argv]) == 2
    assert "invalid" in capsys.readouterr().err


# --- connection settings -----------------------------------------------------------------------------------------


def test_connection_settings_are_checked_before_connecting(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("SUAEXAMPLE\n")
    cases = {
        "choose one way": Config(nats_token="t", nats_nkey_seed=str(seed)),
        "nats_password is missing": Config(nats_user="alice"),
        "nats_user is missing": Config(nats_password="secret-pw"),
        "invalid nats_inbox_prefix": Config(nats_inbox_prefix="_INBOX.>"),
        "invalid nats_inbox_prefix '_INBOX.alice": Config(nats_inbox_prefix="_INBOX.alice\n"),  # `$` passed it
        "both nats_tls_cert and nats_tls_key": Config(nats_tls_cert=str(seed)),
        "cannot read": Config(nats_tls_ca=str(tmp_path / "missing-ca.pem")),
        "no NATS user nkey seed": Config(nats_nkey_seed=str(tmp_path / "user.nk.bad")),
    }
    (tmp_path / "user.nk.bad").write_text("not a seed\n")
    for expected, config in cases.items():
        with pytest.raises(ConnectionSettingsError, match=expected):
            nats_options(config)
    assert "secret-pw" not in repr(cases["nats_user is missing"])


def test_tls_is_wanted_for_tls_settings_and_tls_urls() -> None:
    assert not wants_tls(Config())
    assert wants_tls(Config(nats_url="nats://a:4222,tls://b:4222"))
    assert wants_tls(Config(nats_tls_ca="ca.pem"))


def test_urls_in_logs_hide_passwords_and_tokens() -> None:
    assert redact_url("tls://alice:s3cret@nats.example:4222") == "tls://alice:***@nats.example:4222"
    assert redact_url("nats://tok3n@nats.example:4222") == "nats://***@nats.example:4222"
    assert redact_url("nats://nats.example:4222") == "nats://nats.example:4222"
    assert redact_url("alice:s3cret@nats.example:4222") == "alice:***@nats.example:4222"  # nats-py adds nats://
    assert redact_url("nats.example:4222") == "nats.example:4222"
    assert redact_url("nats://alice:s3cret@nats.example:42x2") == "nats://alice:***@nats.example:42x2"  # no crash


def test_secrets_stay_out_of_repr_and_help() -> None:
    config = Config(nats_password="pw-in-config", nats_token="token-in-config")
    assert "pw-in-config" not in repr(config) and "token-in-config" not in repr(config)
    env = os.environ | {"LLMBUS_NATS_PASSWORD": "pw-in-env", "LLMBUS_NATS_TOKEN": "token-in-env"}
    shown = {}
    for command in ("worker", "gateway", "up"):
        argv = [sys.executable, "-m", "llmbus.cli", command, "--help"]
        shown[command] = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        for flag in CONNECTION_FLAGS:
            assert flag in shown[command], (command, flag)
        assert "pw-in-env" not in shown[command] and "token-in-env" not in shown[command]
    for flag in ("--http-tls-cert", "--http-tls-key", "--rate-limit-per-minute", "--cors-origins"):
        assert flag in shown["gateway"] and flag in shown["up"] and flag not in shown["worker"]
    assert "--secure" in shown["up"] and "--secure" not in shown["gateway"]


# --- llmbus up --secure: the generated files --------------------------------------------------------------------


def test_secure_setup_writes_private_files_and_keeps_the_seeds(tmp_path: Path) -> None:
    config = Config(secure_dir=str(tmp_path / "secure"))
    first = prepare(config, "127.0.0.1", 4333)
    conf = json.loads(first.server_config.read_text())
    users = conf["authorization"]["users"]
    assert [u["permissions"] for u in users] == [
        server_permissions(grants(role, inbox_prefix=f"_INBOX.{role}")) for role in ROLES
    ]
    assert conf["tls"]["cert_file"].endswith("server.pem")
    assert stat.S_IMODE(first.directory.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "worker.nk", "gateway.nk", "client.nk", "client.env", "nats-server.conf"):
        assert stat.S_IMODE((first.directory / name).stat().st_mode) == 0o600, name
    env = dict(shlex.split(line)[0].split("=", 1) for line in first.env_file("client").read_text().splitlines())
    assert env["LLMBUS_NATS_URL"] == "tls://127.0.0.1:4333"
    assert env["LLMBUS_NATS_INBOX_PREFIX"] == "_INBOX.client"
    assert Path(env["LLMBUS_NATS_NKEY_SEED"]).read_text().startswith("SU")
    server_cert = x509.load_pem_x509_certificate((first.directory / "server.pem").read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    again = prepare(config, "127.0.0.1", 4444)
    assert json.loads(again.server_config.read_text())["authorization"]["users"] == users  # same keys, same grants
    assert (again.directory / "ca.pem").read_bytes() == (first.directory / "ca.pem").read_bytes()


# --- the README's server config --------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
README_BLOCKS = {
    "WORKER": grants("worker"),
    "GATEWAY": grants("gateway", inbox_prefix="_INBOX.gateway"),
    "ALICE": grants("client", inbox_prefix="_INBOX.alice"),
}


def readme_server_config() -> str:
    text = README.read_text()
    start = text.index("# nats-server.conf for llmbus")
    return text[start : text.index("```", start)]


async def test_the_readme_server_config_has_the_printed_blocks_and_binds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = readme_server_config()
    for name, role_grants in README_BLOCKS.items():
        start = conf.index(f"{name} = ") + len(f"{name} = ")
        block, _ = json.JSONDecoder().raw_decode(conf, start)
        assert block == server_permissions(role_grants), name
    tls = make_tls(tmp_path)
    conf = conf.replace("/etc/nats/server.pem", tls.server_cert).replace("/etc/nats/server.key", tls.server_key)
    conf = conf.replace("/etc/nats/ca.pem", tls.ca).replace("/var/lib/nats", str(tmp_path / "js"))
    (tmp_path / "nats-server.conf").write_text(conf)
    passwords = {f"LLMBUS_{user}_PASSWORD": "x" for user in ("WORKER", "GATEWAY", "ALICE")}
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats-server.conf")],
        env=os.environ | passwords,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    for name, value in passwords.items():
        monkeypatch.setenv(name, value)
    with NatsServer(config_file=str(tmp_path / "nats-server.conf"), tls=True, jetstream=False) as server:
        alice = Config(
            nats_url=server.url,
            nats_user="alice",
            nats_password="x",
            nats_tls_ca=tls.ca,
            nats_tls_cert=tls.client_cert,
            nats_tls_key=tls.client_key,
            nats_inbox_prefix="_INBOX.alice",
        )
        denied: asyncio.Queue[str] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            denied.put_nowait(str(exc))

        nc = await connect(alice, "test-readme-alice", reconnect_forever=False, on_error=on_error)
        try:
            await nc.subscribe("_INBOX.alice.mine")
            await nc.subscribe("_INBOX.>")
            assert 'permissions violation for subscription to "_inbox.>"' in await asyncio.wait_for(denied.get(), 10)
            assert denied.empty()
        finally:
            await nc.close()
