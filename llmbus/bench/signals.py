"""The signals the bench exits on: SIGTERM and SIGHUP (`kill`, a closed terminal) raise SystemExit in the main
thread, so the `finally` that stops the stack runs as it does on Ctrl-C.

That cleanup is bounded: if it has not ended `EXIT_GRACE_S` after the signal, the bench prints every thread's stack
to stderr (what the cleanup waited on) and exits at once with the signal's status. The workers and the bridge it
started get SIGTERM from the kernel when it exits (`stack.py`: PR_SET_PDEATHSIG), so none is left behind. Once in
CI a bench stayed up for the whole 300 s of pytest's timeout after a SIGTERM, with its bridge running; where its
cleanup waited was never seen.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
EXIT_GRACE_S = 90.0  # the stack's own stop waits up to 30 s for its processes, then kills them
CLEANUP_CUT_SHORT = "the cleanup after {name} did not end within {grace:g} s; exiting now. Where it waited:"


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    for sig in EXIT_SIGNALS:  # the cleanup that follows is not cut short by another signal
        signal.signal(sig, signal.SIG_IGN)
    watchdog = threading.Timer(EXIT_GRACE_S, _exit_now, args=(signum,))
    watchdog.daemon = True
    watchdog.start()
    raise SystemExit(128 + signum)


def _exit_now(signum: int) -> None:
    """The cleanup hangs: say where, and exit without it."""
    print(f"bench: {CLEANUP_CUT_SHORT.format(name=signal.Signals(signum).name, grace=EXIT_GRACE_S)}", file=sys.stderr)
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit (see the module's docstring). A signal ignored already
    stays ignored (`nohup llmbus bench`). Python lets only the main thread set handlers: elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [sig for sig in EXIT_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
