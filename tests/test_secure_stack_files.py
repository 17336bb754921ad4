"""The files of `llmbus up --secure`'s directory: keys and seeds are replaced atomically (a crash leaves the old file,
never an empty one), and a damaged file, or an unusable directory, stops `up --secure` with an error that names it
and says to delete it, instead of a traceback."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from llmbus.config import Config
from llmbus.secure_stack import SecureDirError, prepare, write_private
from llmbus.stack import run_stack


def prepared(directory: Path) -> Config:
    config = Config(secure=True, secure_dir=str(directory))
    prepare(config, "127.0.0.1", 4333)
    return config


def test_a_key_is_replaced_atomically_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed before the new content is on disk (here: at its fsync), the old file is whole and no temp is left."""
    path = tmp_path / "worker.nk"
    path.write_bytes(b"old seed")
    path.chmod(0o644)

    def killed(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_private(path, b"new seed")
    monkeypatch.undo()
    assert path.read_bytes() == b"old seed" and list(tmp_path.iterdir()) == [path]
    write_private(path, b"new seed")
    assert path.read_bytes() == b"new seed" and list(tmp_path.iterdir()) == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("worker.nk", b""),  # what a crash between O_TRUNC and the write used to leave
        ("client.nk", b"SUAnotaseed\n"),
        ("ca.key", b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"),
        ("ca.pem", None),  # cut short
    ],
)
def test_a_damaged_file_is_named_with_how_to_regenerate_it(tmp_path: Path, name: str, damage: bytes | None) -> None:
    directory = tmp_path / "secure"
    config = prepared(directory)
    file = directory / name
    file.write_bytes(file.read_bytes()[:100] if damage is None else damage)
    message = f"cannot use {file} ("
    with pytest.raises(SecureDirError, match=re.escape(message) + rf".*: delete it.*, or the directory {directory}"):
        prepare(config, "127.0.0.1", 4333)
    file.unlink()
    prepare(config, "127.0.0.1", 4333)  # regenerated
    assert file.stat().st_size > 0


async def test_up_secure_with_a_damaged_seed_says_which_file_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "secure"
    config = prepared(directory)
    (directory / "worker.nk").write_bytes(b"")
    assert await run_stack(config, ["worker"], embedded_nats=True) == 1
    error = capsys.readouterr().err
    assert f"llmbus: error: cannot use {directory / 'worker.nk'} (ErrInvalidSeed" in error
    assert "Traceback" not in error


def test_a_directory_that_is_not_one_or_not_ours_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a file"
    file.write_text("")
    with pytest.raises(SecureDirError, match=re.escape(f"cannot use {file} (FileExistsError")):
        prepare(Config(secure=True, secure_dir=str(file)), "127.0.0.1", 4333)

    def not_owner(path: Path, mode: int) -> None:  # chmod of another user's directory (the tests may run as root)
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(Path, "chmod", not_owner)
    directory = tmp_path / "theirs"
    with pytest.raises(SecureDirError, match=re.escape(f"cannot use {directory} (PermissionError") + ".*--secure-dir"):
        prepare(Config(secure=True, secure_dir=str(directory)), "127.0.0.1", 4333)
