"""Watching processes that are not our children (a server or compiler left behind by a killed parent)."""

from __future__ import annotations

import time
from pathlib import Path


def process_exits(pid: int, polls: int = 600) -> bool:
    """Whether process `pid` is gone, or a zombie with all its threads gone, within `polls` looks 0.05 s apart.

    A multithreaded process's first thread shows as a zombie while its other threads are still exiting, and those
    still hold its files and sockets open: a Go server read as gone too early could still accept on its port.
    """
    for _ in range(polls):
        if _has_exited(pid):
            return True
        time.sleep(0.05)
    return False


def _has_exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z" and len(threads) <= 1


def pid_written_to(path: Path, polls: int = 1200) -> int:
    """The process id that a process writes as the first line of `path`, once it has (within `polls` looks)."""
    for _ in range(polls):
        if path.exists() and (text := path.read_text()).endswith("\n"):
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no process id written to {path}")
