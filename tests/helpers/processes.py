"""Watching processes that are not our children (a server or compiler left behind by a killed parent)."""

from __future__ import annotations

import time
from pathlib import Path


def process_exits(pid: int, polls: int = 600) -> bool:
    """Whether process `pid` is gone (or a zombie, dead but not yet reaped) within `polls` looks, 0.05 s apart."""
    for _ in range(polls):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def pid_written_to(path: Path, polls: int = 1200) -> int:
    """The process id that a process writes as the first line of `path`, once it has (within `polls` looks)."""
    for _ in range(polls):
        if path.exists() and (text := path.read_text()).endswith("\n"):
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no process id written to {path}")
