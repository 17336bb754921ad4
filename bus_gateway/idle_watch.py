"""A stream's idle timeout with one timer per stream, not one per message.

A stream fails with `no_reply` (504 `timeout`) when its reader has waited `idle` seconds for the next message. An
`asyncio.timeout` around each wait schedules and cancels a loop timer for every message, which cost about a tenth
of the HTTP bridge's CPU at 64 streaming clients (`llmbus bench --http`), CPU that the bridge takes from a worker's
decode step when they share a machine. Here one timer per stream wakes at most once per `idle` seconds while
messages keep coming: when it finds the reader has waited `idle` seconds on an empty queue, it puts `IDLE` in the
queue, which wakes the reader with the timeout; otherwise it sleeps until `idle` seconds after the reader's current
wait began. A message that arrived first is always read first: `IDLE` goes only into an empty queue."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from bus_gateway.bus_errors import no_reply

EARLY_S = 0.001  # the loop may run a timer up to its clock resolution early
IDLE = Msg(_client=None, subject="")  # type: ignore[arg-type]  # compared by identity only; never leaves this module


class IdleWatch:
    def __init__(self, answers: asyncio.Queue[Msg], idle: float) -> None:
        self.answers = answers
        self.idle = idle
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def next(self) -> Msg:
        """The next message; `BusError` 504 after `idle` seconds without one."""
        if not self.answers.empty():
            msg = self.answers.get_nowait()
        else:
            self._waiting_since = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._waiting_since + self.idle, self._check)
            try:
                msg = await self.answers.get()
            finally:
                self._waiting_since = None
        if msg is IDLE:
            raise no_reply(self.idle, idle=True)
        return msg

    def drop_queued(self) -> None:
        while not self.answers.empty():
            self.answers.get_nowait()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since = self._waiting_since
        if since is None:
            return  # not waiting: the next wait starts the timer again
        now = self._loop.time()
        if since + self.idle - now > EARLY_S:
            at = since + self.idle  # the reader woke and waits again since
        elif self.answers.empty():
            self.answers.put_nowait(IDLE)
            return
        else:
            at = now + self.idle  # a message is queued: the reader is about to read it
        self._timer = self._loop.call_at(at, self._check)
