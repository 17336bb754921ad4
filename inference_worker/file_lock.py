"""An exclusive lock on a file path, shared by processes (and threads) on one host: `flock` on a lock file, so that
workers sharing a cache directory do a piece of work (a build, a conversion) once.

Lock files are opened read-only (`flock` needs no write access), so users who share a cache directory lock one
another out as they should, whoever created the file. A lock file is removed only by `remove_if_free`, which
unlinks it while holding it; a taker checks, once it holds its file, that the path still names that file, and
starts again if not. Unlinked by path alone, a lock file held by one process could be replaced by a fresh one that
another process then also locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

POLL_S = 0.5
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # no lock file can be made: `exclusive` yields False


class Stopped(Exception):
    """`stop` was set while waiting for the lock."""


@contextlib.contextmanager
def exclusive(
    path: Path, stop: threading.Event | None = None, on_wait: Callable[[], None] | None = None
) -> Iterator[bool]:
    """Hold the lock of `path` within the block; yields True, or False where no lock file can be made for want of
    permission (a read-only directory or file system: then nothing can be written there either). Any other error
    is raised: a directory that does not exist, above all, would let every worker go ahead unlocked. Waits while
    another holder has it, calling `on_wait` once; with `stop`, polls, and raises `Stopped` once it is set."""
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as exc:
            if exc.errno not in UNWRITABLE:
                raise
            fd = None
        if fd is None:
            yield False
            return
        try:
            if not _try(fd):
                if not waited:
                    waited = True
                    if on_wait is not None:
                        on_wait()
                _wait(fd, stop)
            if _names(path, fd):
                with contextlib.suppress(OSError):
                    os.utime(fd)  # taken now: an old lock file is one nobody took for a while
                yield True
                return
        finally:
            os.close(fd)  # releases the lock


def remove_if_free(path: Path) -> None:
    """Remove the lock file `path` unless someone holds it (or waits for it and gets it first)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if _try(fd) and _names(path, fd):
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait(fd: int, stop: threading.Event | None) -> None:
    if stop is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while not _try(fd):
        if stop.wait(POLL_S):
            raise Stopped


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed, nor replaced, meanwhile)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
