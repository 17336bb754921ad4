"""An EngineThread on a real (tiny) model whose events land in a queue, for the engine-thread tests: the forward and
the sink can be made to raise on demand (`Faulty`), and its deaths are recorded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from inference_worker.engine import EngineConfig, Event, Failed, Finished, LLMEngine
from inference_worker.engine_thread import EngineThread
from inference_worker.model_loader import LoadedModel

WAIT_S = 60  # a broken run fails after this; a passing one never waits that long


class Fault(Exception):
    pass


class Faulty:
    """Wraps a callable; raises `Fault` on the next `times` calls once armed."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.left = 0

    def arm(self, times: int = 1) -> None:
        self.left = times

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.left > 0:
            self.left -= 1
            raise Fault("injected")
        return self.fn(*args, **kwargs)


class EngineHarness:
    """`engine.runner.forward` and `sink` are `Faulty` (unarmed); `on_events` sees each delivery before the queue."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        on_events: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.config = config or EngineConfig(max_batch_size=4)
        self.events: queue.Queue[Event] = queue.Queue()
        self.deaths: list[BaseException] = []
        self.died = threading.Event()
        self.on_events = on_events
        self.sink = Faulty(self._deliver)
        self.thread = EngineThread(lambda: self._build(loaded), lambda events: self.sink(events), self._on_death)
        self.engine = self.thread.start()

    def _build(self, loaded: LoadedModel) -> LLMEngine:
        engine = LLMEngine(loaded, self.config)
        engine.runner.forward = Faulty(engine.runner.forward)  # type: ignore[method-assign]
        return engine

    def _deliver(self, events: list[Event]) -> None:
        if self.on_events is not None:
            self.on_events(events)
        for event in events:
            self.events.put(event)

    def _on_death(self, exc: BaseException) -> None:
        self.deaths.append(exc)
        self.died.set()

    def first_event(self, request_id: str) -> Event:
        while True:
            event = self.events.get(timeout=WAIT_S)
            if event.request_id == request_id:
                return event

    def until_final(self, request_id: str) -> list[Event]:
        """The events of `request_id`, up to its Finished or Failed."""
        seen: list[Event] = []
        while True:
            event = self.events.get(timeout=WAIT_S)
            if event.request_id == request_id:
                seen.append(event)
                if isinstance(event, Finished | Failed):
                    return seen

    def final(self, request_id: str) -> Finished | Failed:
        last = self.until_final(request_id)[-1]
        assert isinstance(last, Finished | Failed)
        return last

    def finals(self, ids: set[str]) -> dict[str, Finished | Failed]:
        found: dict[str, Finished | Failed] = {}
        while set(found) != ids:
            event = self.events.get(timeout=WAIT_S)
            if isinstance(event, Finished | Failed) and event.request_id in ids:
                found[event.request_id] = event
        return found
