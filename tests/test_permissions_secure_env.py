"""`llmbus up --secure`'s per-role env files, loaded the way it says (`set -a; . client.env; set +a`) in a real sh or
bash, and what `up --secure` says when the environment already names a NATS server to join."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmbus.config import Config
from llmbus.connection import connect
from llmbus.nats_server import env_without_proxy, free_port
from llmbus.permissions import ROLES
from llmbus.secure_stack import prepare
from llmbus.stack import start_embedded_nats

# a directory name a shell would split, expand or run, if a path were written or printed unquoted
HOSTILE_NAME = "secure dir $(touch ran-dollar) `touch ran-backtick` 'q' \"dq\" ;touch ran-semicolon"
SHELLS = [shell for shell in ("sh", "bash") if any((Path(d) / shell).exists() for d in ("/bin", "/usr/bin"))]
EXIT_TIMEOUT_S = 60


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LLMBUS_ setting, so that only what a test sets (or a file sources) applies."""
    env = {k: v for k, v in env_without_proxy().items() if not k.startswith("LLMBUS_")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | extra


def sourced(shell: str, load_command: str, cwd: Path) -> dict[str, str]:
    """The LLMBUS_ variables a real `shell` has after running `load_command`, read back NUL-separated."""
    script = f'{load_command}; env -0 | grep -z "^LLMBUS_" || true'
    done = subprocess.run([shell, "-c", script], cwd=cwd, env=clean_env(), capture_output=True, check=True)
    return dict(entry.split("=", 1) for entry in done.stdout.decode().split("\0") if entry)


def ran_a_command(root: Path) -> list[Path]:
    return list(root.rglob("ran-*"))


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("given_as", ["--secure-dir", "LLMBUS_CACHE_DIR"])
async def test_the_printed_load_command_sets_the_exact_absolute_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], shell: str, given_as: str
) -> None:
    """A relative secure directory, with a space, quotes and `$(...)` in its name: the command `up --secure` prints
    loads, from any directory, the absolute paths it wrote, runs nothing, and logs the client in."""
    started_in, elsewhere = tmp_path / "started in", tmp_path / "elsewhere"
    started_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started_in)
    if given_as == "LLMBUS_CACHE_DIR":
        monkeypatch.setenv("LLMBUS_CACHE_DIR", HOSTILE_NAME)
        config, directory = Config(secure=True, nats_port=free_port()), started_in / HOSTILE_NAME / "secure"
    else:
        config, directory = (
            Config(secure=True, secure_dir=HOSTILE_NAME, nats_port=free_port()),
            started_in / HOSTILE_NAME,
        )
    server, _ = await start_embedded_nats(config, ["gateway"], None)
    try:
        printed = capsys.readouterr().out
        load_command = printed.split("(load with: ", 1)[1].split(")\n", 1)[0]
        settings = sourced(shell, load_command, elsewhere)
        assert settings == {
            "LLMBUS_NATS_URL": server.url,
            "LLMBUS_NATS_TLS_CA": str(directory / "ca.pem"),
            "LLMBUS_NATS_NKEY_SEED": str(directory / "client.nk"),
            "LLMBUS_NATS_INBOX_PREFIX": "_INBOX.client",
            "LLMBUS_SUBJECT_PREFIX": "llm",
        }
        monkeypatch.chdir(elsewhere)
        nc = await connect(Config.load(env=settings), "test-sourced-client", reconnect_forever=False)
        await nc.close()
    finally:
        server.stop()
    assert ran_a_command(tmp_path) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_every_roles_env_file_sources_to_its_settings(tmp_path: Path, shell: str) -> None:
    setup = prepare(Config(secure_dir=str(tmp_path / HOSTILE_NAME)), "127.0.0.1", 4333)
    for role in ROLES:
        expected = {f"LLMBUS_{name.upper()}": value for name, value in setup.settings(role).items()}
        assert sourced(shell, f"set -a; . ./{role}.env; set +a", setup.directory) == expected, role
        assert sourced(shell, setup.load_command(role), tmp_path) == expected, role
    assert ran_a_command(tmp_path) == []


def up_secure(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llmbus.cli", "up", "--secure", "--secure-dir", str(tmp_path / "up"), *argv]
    return subprocess.run(
        command, env=clean_env(**env), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, cwd=tmp_path
    )


def test_up_secure_after_sourcing_client_env_names_the_variable_to_unset(tmp_path: Path) -> None:
    """The scenario as a user meets it: load client.env in a shell, then run `llmbus up --secure` again."""
    setup = prepare(Config(secure_dir=str(tmp_path / "first")), "127.0.0.1", 4333)
    up = [sys.executable, "-m", "llmbus.cli", "up", "--secure", "--secure-dir", str(tmp_path / "up")]
    script = f'{setup.load_command("client")}; exec "$@"'
    done = subprocess.run(
        ["sh", "-c", script, "sh", *up], env=clean_env(), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S
    )
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("llmbus: error: --secure starts its own nats-server, but LLMBUS_NATS_URL is set")
    assert "tls://127.0.0.1:4333" in error and "unset LLMBUS_NATS_URL" in error and "--nats-url" not in error
    assert not (tmp_path / "up").exists()  # refused before anything was made


@pytest.mark.parametrize(
    "env",
    [{}, {"LLMBUS_NATS_URL": "tls://127.0.0.1:4333"}],  # the flag overrides the variable: the flag is named
)
def test_up_secure_with_nats_url_names_the_flag(tmp_path: Path, env: dict[str, str]) -> None:
    done = up_secure(tmp_path, "--nats-url", "nats://alice:s3cret@127.0.0.1:4999", **env)
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error == (
        "llmbus: error: --secure starts its own nats-server: it cannot be combined with"
        " --nats-url nats://alice:***@127.0.0.1:4999"
    )
