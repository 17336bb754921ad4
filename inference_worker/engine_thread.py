"""`EngineThread`: runs `LLMEngine.step()` in a dedicated thread, with a watchdog.

The asyncio side meets it at one inbox queue (`submit`, `cancel`, `set_threads`, `stop` are thread-safe) and
receives events through `sink`, called from the engine thread after each phase of a step.

Errors: a step phase that raises fails what is in flight with a 500 and the engine goes on (`LLMEngine.step`),
as does a request whose building or `add_request` raises (that request gets a 500). Anything else that raises
in the thread (the sink, `fail_all` itself, the loop) means the engine cannot go on: the thread answers every
request it holds or has queued with a 500 (through the sink, if the sink still works), calls `on_death(exc)`
and ends. A `submit` after that is answered with a 500 at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inference_worker.events import Accepted, Event, Failed, Finished, TokenDelta
from inference_worker.sequence import Sequence

if TYPE_CHECKING:
    from inference_worker.engine import LLMEngine

log = logging.getLogger("llmbus.engine")

Request = Sequence | Callable[[], Sequence | Failed]


@dataclass(slots=True, frozen=True)
class _Submit:
    request: Request
    request_id: str


@dataclass(slots=True, frozen=True)
class _Cancel:
    request_id: str


@dataclass(slots=True, frozen=True)
class _SetThreads:
    threads: int


_STOP = object()


class EngineThread:
    """The engine is built inside the thread by `build`, so that every torch op of the engine (the KV cache's
    allocation included) runs in one OS thread: when two threads share the work, libgomp keeps a thread pool
    per thread and the steps ran 20-30% slower on 1.5 of 2 cores (measured on the bench machine)."""

    def __init__(
        self,
        build: Callable[[], LLMEngine],
        sink: Callable[[list[Event]], None],
        on_death: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.build = build
        self.engine: LLMEngine | None = None
        self.sink = sink
        self.on_death = on_death
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = torch.get_num_threads()
        self.death: BaseException | None = None
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmbus-engine", daemon=True)
        self._built = threading.Event()
        self._build_error: BaseException | None = None

    def start(self) -> LLMEngine:
        """Start the thread and wait until its engine is built (blocking: call it off the event loop)."""
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        assert self.engine is not None
        return self.engine

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.death is None

    def submit(self, request: Request, request_id: str | None = None) -> None:
        """Queue a `Sequence`, or a zero-argument callable that builds one (or a `Failed`) in the engine thread, so
        that templating and tokenizing stay off the caller's event loop. A callable needs its `request_id`, so
        that it can be answered if building it raises."""
        if isinstance(request, Sequence):
            request_id = request.request_id
        elif request_id is None:
            raise ValueError("submit(callable) needs the request_id of the request it builds")
        with self._lock:
            if self.death is None:
                self.inbox.put(_Submit(request, request_id))
                return
        self.sink([Failed(request_id, 500, f"the engine has stopped: {self.death!r}")])

    def cancel(self, request_id: str) -> None:
        self.inbox.put(_Cancel(request_id))

    def set_threads(self, threads: int) -> None:
        """Use `threads` torch threads from the next step on (set in the engine thread, where the steps run)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.inbox.put(_SetThreads(threads))

    def stop(self, timeout: float | None = None) -> None:
        self.inbox.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.engine = engine = self.build()
        except BaseException as exc:
            self._build_error = exc
            return
        finally:
            self._built.set()
        try:
            self._serve(engine)
        except BaseException as exc:
            self._die(exc)
        finally:
            engine.close()

    def _serve(self, engine: LLMEngine) -> None:
        while True:
            events: list[Event] = []
            idle = not engine.has_work()
            if not self._take(engine, events, block=idle):
                return
            if idle and engine.has_work() and engine.config.max_wait_ms > 0:
                hold_until = time.monotonic() + engine.config.max_wait_ms / 1000
                while engine.num_waiting < engine.max_rows and (left := self._hold_left(engine, hold_until)) > 0:
                    if events:  # `Accepted` goes out at once, not after the wait
                        self._emit(events)
                        events = []
                    if not self._take(engine, events, block=True, timeout=left):
                        return
            if events:
                self._emit(events)
            engine.step(emit=self._emit)

    @staticmethod
    def _hold_left(engine: LLMEngine, hold_until: float) -> float:
        """Seconds the `max_wait_ms` hold may still wait: it ends early at a waiting request's deadline, which the
        next step then answers with a 504 (a hold is not a way past a client's timeout)."""
        return min(hold_until, engine.scheduler.first_deadline()) - time.monotonic()

    def _emit(self, events: list[Event]) -> None:
        self.sink(events)
        for event in events:
            if isinstance(event, Finished | Failed):
                self._held.discard(event.request_id)

    def _take(self, engine: LLMEngine, events: list[Event], block: bool, timeout: float | None = None) -> bool:
        """Apply every queued command (waiting for one if `block`); False once asked to stop."""
        try:
            command = self.inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:  # what the commands before it produced still goes out (a 400, a cancel)
                if events:
                    self._emit(events)  # the sink may keep this list: it is never touched again
                return False
            if isinstance(command, _Submit):
                events += self._admit(engine, command)
            elif isinstance(command, _Cancel):
                events += self._cancel(engine, command.request_id)
            elif isinstance(command, _SetThreads):
                torch.set_num_threads(command.threads)
                self.threads = torch.get_num_threads()
            try:
                command = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _admit(self, engine: LLMEngine, command: _Submit) -> list[Event]:
        try:
            seq = command.request() if callable(command.request) else command.request
        except Exception as exc:
            log.exception("building request %s failed", command.request_id)
            message = f"internal error while preparing the request: {exc!r}"
            return [engine.count_failed(Failed(command.request_id, 500, message))]
        if isinstance(seq, Failed):
            return [engine.count_failed(seq)]
        try:
            failed = engine.add_request(seq)
        except Exception as exc:
            log.exception("add_request(%s) failed", seq.request_id)
            return [engine.count_failed(Failed.of(seq, 500, f"internal engine error: {exc!r}"))]
        if failed is not None:  # add_request counted it
            return [failed]
        self._held.add(seq.request_id)
        return [Accepted(seq.request_id)] if seq.stream else []

    def _cancel(self, engine: LLMEngine, request_id: str) -> list[Event]:
        try:
            seq = engine.cancel(request_id)
        except Exception as exc:
            log.exception("cancel(%s) failed; failing every request in flight", request_id)
            return engine.fail_all(500, f"internal engine error: {exc!r}")
        if seq is None:
            return []
        # a stream's last delta: the tail `take_delta` held back while it could still start a stop string
        delta = seq.take_delta() if seq.stream else ""
        return [TokenDelta(request_id, delta), Finished.of(seq)] if delta else [Finished.of(seq)]

    def _die(self, exc: BaseException) -> None:
        log.critical("the engine thread cannot go on; failing what it holds", exc_info=exc)
        with self._lock:
            self.death = exc
            queued = self._drain_inbox()
        failed = [Failed(rid, 500, f"the engine stopped: {exc!r}") for rid in [*sorted(self._held), *queued]]
        self._held.clear()
        if failed:
            try:
                self.sink(failed)
            except Exception:
                log.exception("could not deliver the failures of %d requests", len(failed))
        if self.on_death is not None:
            try:
                self.on_death(exc)
            except Exception:
                log.exception("on_death raised")

    def _drain_inbox(self) -> list[str]:
        queued = []
        while True:
            try:
                command = self.inbox.get_nowait()
            except queue.Empty:
                return queued
            if isinstance(command, _Submit):
                queued.append(command.request_id)
