"""What `Worker`'s mixins (`Intake`, `JobIntake`, `Forwarding`, `WorkerFacts`) use of it, declared in one place.

`Worker` (worker.py) inherits those mixins, which inherit `WorkerParts`: so the mixins are typed against this list
rather than against `Worker`, and none of them imports worker.py. The class only declares; it sets nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from inference_worker.held import Replier

if TYPE_CHECKING:
    from inference_worker.batches import BatchCoordinator
    from inference_worker.engine import LLMEngine
    from inference_worker.engine_thread import EngineThread
    from inference_worker.forward_probe import ForwardProbe
    from inference_worker.held import HeldRequests, Key
    from inference_worker.job_consumer import JobConsumer
    from inference_worker.metrics import WorkerMetrics
    from inference_worker.micro import MicroService
    from inference_worker.model_loader import LoadedModel
    from inference_worker.outbox import Outbox
    from inference_worker.requests import Limits
    from inference_worker.routing import ModelDirectory
    from llmbus.config import Config
    from schemas import Subjects

Handler = Callable[[Replier], Awaitable[None]]  # an endpoint's handler, given a request or a durable job


class WorkerParts:
    """The worker's state and methods that its mixins use: `Worker.__init__` sets the state (`outbox` and `engine`:
    `Worker.start`), `Worker` and `Intake` define the methods."""

    # what the worker serves, and how
    config: Config
    loaded: LoadedModel
    model_name: str
    subjects: Subjects
    limits: Limits
    threads: int

    # requests in flight
    held: HeldRequests
    batches: dict[Key, asyncio.Task[None]]
    routing: set[asyncio.Task[None]]  # requests waiting for a look at the bus
    _idle: asyncio.Event  # set when nothing is in flight (`drain` waits for it)
    _capacity: asyncio.Event  # set when a request or a batch is done (`JobIntake.wait_for_capacity`)

    # the worker's parts
    directory: ModelDirectory
    coordinator: BatchCoordinator
    probe: ForwardProbe
    jobs: JobConsumer | None
    service: MicroService | None
    metrics: WorkerMetrics
    outbox: Outbox
    engine: LLMEngine
    _thread: EngineThread | None

    # its lifecycle
    accepting: bool
    draining: bool
    dead: BaseException | None  # why the engine thread died

    # `Worker`'s methods
    nothing_in_flight: Callable[[], bool]
    _released: Callable[[], None]

    # `Intake`'s endpoint handlers, which a durable job goes through too (`JobIntake.run_job`)
    route_chat: Handler
    route_batch: Handler
    serve_chat: Handler
    serve_batch: Handler
