"""Engine-side hardening: answers handed over with a stop reach the real Outbox, rows that finish together cost no KV
copies, one-off tenants leave nothing in the admission queue, and the cgroup v2 memory room counts page cache as
room."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch

from helpers.tiny_model import chat_prompt, tiny_model
from inference_worker import memory
from inference_worker.admission import WaitingQueue
from inference_worker.engine import EngineConfig, Event, Failed, Finished, LLMEngine
from inference_worker.engine_thread import EngineThread
from inference_worker.held import Held, HeldRequests
from inference_worker.metrics import WorkerMetrics
from inference_worker.model_loader import LoadedModel
from inference_worker.outbox import Outbox
from inference_worker.sampling_params import SamplingParams
from inference_worker.scheduler import Scheduler
from inference_worker.sequence import Sequence, Status
from schemas import ChatChunk, ErrorBody, WireError
from schemas.codec import JSON

WAIT_S = 60
LONG = SamplingParams(max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


# --- events handed over with a stop ------------------------------------------------------------------------------


class Recorder:
    """A `Replier` that records what the outbox sends it; `final` waits for its last message."""

    data = b""
    headers = None
    reply = "_INBOX.test"

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict[str, str] | None, bool, WireError | None]] = []
        self.changed = asyncio.Event()

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None, *, final: bool = True) -> None:
        self._record(data, headers, final, None)

    async def respond_error(self, error: WireError, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self._record(data, headers, True, error)

    async def forward(self, subject: str) -> None:
        raise AssertionError("nothing is forwarded here")

    def _record(self, data: bytes, headers: dict[str, str] | None, final: bool, error: WireError | None) -> None:
        self.sent.append((data, headers, final, error))
        self.changed.set()

    async def first(self) -> None:
        await asyncio.wait_for(self.changed.wait(), WAIT_S)


def slow_refusal(building: threading.Event, release: threading.Event) -> Callable[[], Failed]:
    """The build of request `first`: it says that it started, waits to be released, then refuses the request."""

    def build() -> Failed:
        building.set()
        release.wait(WAIT_S)
        return Failed("first", 400, "bad input")

    return build


class CountingInbox(queue.SimpleQueue):
    """The engine thread's inbox, which says when `wanted` commands are queued at once."""

    def __init__(self) -> None:
        self.wanted = 0
        self.reached = threading.Event()

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.wanted and self.qsize() >= self.wanted:
            self.reached.set()


def hold(held: HeldRequests, request_id: str, stream: bool = False) -> Recorder:
    recorder = Recorder()
    held.hold(Held(recorder, (recorder.reply, request_id), request_id, JSON, f"chat-{request_id}", stream))
    return recorder


async def test_a_refusal_and_a_cancel_read_with_the_stop_are_published_by_the_real_outbox(tiny: LoadedModel) -> None:
    """The engine thread reads two refusals, a cancel and the stop in one pass: all three answers go out through the
    Outbox (which only queues what it is handed for the event loop), and nothing is left held for the worker's 503."""
    held = HeldRequests()
    outbox = Outbox(held, "tiny", lambda: None, WorkerMetrics("tiny", "w-hardening"))
    publishing = asyncio.create_task(outbox.run())
    long, first, second = hold(held, "long", stream=True), hold(held, "first"), hold(held, "second")
    thread = EngineThread(lambda: LLMEngine(tiny, EngineConfig(max_batch_size=4)), outbox.put)
    thread.inbox = inbox = CountingInbox()
    await asyncio.to_thread(thread.start)
    thread.submit(Sequence("long", chat_prompt(tiny, "long"), LONG, stream=True))
    await long.first()  # its `accepted` chunk: the engine holds it
    building, release = threading.Event(), threading.Event()
    thread.submit(slow_refusal(building, release), "first")
    assert await asyncio.to_thread(building.wait, WAIT_S)  # the engine thread is inside it; the rest queue behind
    inbox.wanted = 3
    thread.cancel("long")
    thread.submit(lambda: Failed("second", 400, "also bad"), "second")
    stopping = threading.Thread(target=thread.stop, args=(WAIT_S,))
    stopping.start()
    assert await asyncio.to_thread(inbox.reached.wait, WAIT_S)  # the cancel, the second refusal and the stop
    release.set()
    await asyncio.to_thread(stopping.join, WAIT_S)
    outbox.close()
    await asyncio.wait_for(publishing, WAIT_S)

    assert len(held) == 0
    for recorder, message in ((first, "bad input"), (second, "also bad")):
        [(data, _, final, error)] = recorder.sent
        assert final and error is not None and error.code == 400
        assert msgspec.json.decode(data, type=ErrorBody).error == message
    data, _, final, error = long.sent[-2]  # the end of the stream, then the sentinel
    end = msgspec.json.decode(data, type=ChatChunk)
    assert final and error is None and end.done and end.finish_reason == "cancelled"


async def test_the_outbox_publishes_what_it_was_handed_even_if_the_caller_reuses_the_list() -> None:
    held = HeldRequests()
    outbox = Outbox(held, "tiny", lambda: None, WorkerMetrics("tiny", "w-reuse"))
    recorder = hold(held, "r")
    events: list[Event] = [Failed("r", 400, "refused")]
    outbox.put(events)  # from this (the loop's) thread too, the hand-off runs later, on the loop
    events.clear()
    await asyncio.sleep(0)  # the hand-off runs
    outbox.close()
    await asyncio.wait_for(outbox.run(), WAIT_S)
    assert [error.code for *_, error in recorder.sent if error is not None] == [400] and len(held) == 0


async def test_closing_the_outbox_right_after_a_put_still_publishes_it() -> None:
    """`close` cannot overtake events still on their way to the loop (put from another thread just before)."""
    held = HeldRequests()
    outbox = Outbox(held, "tiny", lambda: None, WorkerMetrics("tiny", "w-close"))
    recorder = hold(held, "r")
    engine_side = threading.Thread(target=outbox.put, args=([Failed("r", 400, "refused")],))
    engine_side.start()
    engine_side.join(WAIT_S)  # put has returned, and the loop has not run since: the events are on their way
    outbox.close()
    await asyncio.wait_for(outbox.run(), WAIT_S)
    assert [error.code for *_, error in recorder.sent if error is not None] == [400] and len(held) == 0


def test_the_engine_thread_never_changes_a_list_it_handed_to_the_sink(tiny: LoadedModel) -> None:
    """The sink may keep the very list it is given and read it later (the Outbox reads it on the event loop)."""
    handed: list[list[Event]] = []
    thread = EngineThread(lambda: LLMEngine(tiny, EngineConfig(max_batch_size=4)), handed.append)
    thread.inbox = inbox = CountingInbox()
    thread.start()
    building, release = threading.Event(), threading.Event()
    thread.submit(slow_refusal(building, release), "first")
    assert building.wait(WAIT_S)
    inbox.wanted = 2
    thread.submit(lambda: Failed("second", 400, "also bad"), "second")
    stopping = threading.Thread(target=thread.stop, args=(WAIT_S,))
    stopping.start()
    assert inbox.reached.wait(WAIT_S)
    release.set()
    stopping.join(WAIT_S)
    assert [event for events in handed for event in events] == [
        Failed("first", 400, "bad input"),
        Failed("second", 400, "also bad"),
    ]


# --- releasing finished rows -------------------------------------------------------------------------------------


def full_batch(n: int) -> Scheduler:
    scheduler = Scheduler(n, 10**9)
    for i in range(n):
        scheduler.add(Sequence(f"r{i}", [1] * 10, SamplingParams()))
    scheduler.prefilled(scheduler.admit())
    return scheduler


def test_finished_rows_at_the_end_are_dropped_not_copied_into_holes() -> None:
    scheduler = full_batch(64)
    for seq in scheduler.running:
        seq.finish("length")
    assert scheduler.release_finished() == [] and scheduler.running == []

    scheduler = full_batch(64)
    live = scheduler.running[31]
    for seq in [scheduler.running[0], *scheduler.running[32:]]:
        seq.finish("length")
    assert scheduler.release_finished() == [(live, 31, 0)]
    assert [seq.slot for seq in scheduler.running] == list(range(31)) and scheduler.running[0] is live
    assert all(seq.status is not Status.FINISHED for seq in scheduler.running)


def run_counting_moves(loaded: LoadedModel, prompts: list[list[int]], lengths: list[int]) -> tuple[dict, list]:
    """Every prompt admitted in one prefill; returns each request's text and the KV row moves the engine made."""
    engine = LLMEngine(
        loaded, EngineConfig(max_batch_size=len(prompts), prefill_budget=1 << 16, max_seq_len=128, prefix_cache=False)
    )
    moves: list[tuple[int, int, int]] = []
    move_row = engine.runner.move_row

    def counted(src: int, dst: int, length: int) -> None:
        moves.append((src, dst, length))
        move_row(src, dst, length)

    engine.runner.move_row = counted
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
    texts: dict[str, str] = {}
    while engine.has_work():
        texts |= {e.request_id: e.text for e in engine.step() if isinstance(e, Finished)}
    assert engine.stats.max_running == len(prompts)  # they all ran together
    return texts, moves


def test_the_engine_copies_only_live_rows_and_they_decode_as_before(tiny: LoadedModel) -> None:
    n = 64
    prompts = [chat_prompt(tiny, f"prompt number {i}: " + "word " * (i % 7)) for i in range(n)]
    texts, moves = run_counting_moves(tiny, prompts, [6] * n)
    assert len(texts) == n and moves == []  # all 64 finish in the same step: nothing to copy

    early = {0, *range(n // 2, n)}
    lengths = [4 if i in early else 12 for i in range(n)]
    texts, moves = run_counting_moves(tiny, prompts, lengths)
    assert [(src, dst) for src, dst, _ in moves] == [(n // 2 - 1, 0)]  # one live row fills the hole at row 0
    survivors = [i for i in range(n) if i not in early]
    alone, _ = run_counting_moves(tiny, [prompts[i] for i in survivors], [12] * len(survivors))
    assert [texts[f"r{i}"] for i in survivors] == [alone[f"r{j}"] for j in range(len(survivors))]


# --- admission: the aging clock ----------------------------------------------------------------------------------


def test_one_off_tenants_leave_nothing_behind_and_a_returning_tenant_ages_as_before() -> None:
    queue_ = WaitingQueue(aging=4)
    for i in range(10_000):  # every request names a tenant of its own (clients set Llmbus-Tenant themselves)
        queue_.append(Sequence(f"r{i}", [1], SamplingParams(), tenant=f"tenant-{i}"))
        if i % 3:
            queue_.popleft()
        else:
            queue_.remove(next(iter(queue_)))
    assert len(queue_) == 0 and len(queue_._admitted) == 0

    queue_.append(Sequence("kept", [1], SamplingParams(), tenant="kept"))
    queue_.clear()
    assert len(queue_._admitted) == 0

    def patient_admitted_after(waiting: WaitingQueue) -> int:
        waiting.append(Sequence("patient", [1], SamplingParams(), tenant="a", priority=2))
        for i in range(40):
            waiting.append(Sequence(f"urgent-{i}", [1], SamplingParams(), tenant="a"))
            if waiting.popleft().request_id == "patient":
                return i + 1
        raise AssertionError("starved")

    returning = WaitingQueue(aging=4)
    for i in range(5):  # tenant "a" was served before and left nothing waiting
        returning.append(Sequence(f"old-{i}", [1], SamplingParams(), tenant="a"))
        returning.popleft()
    assert patient_admitted_after(returning) == patient_admitted_after(WaitingQueue(aging=4)) == 9


# --- memory: the cgroup v2 limit ---------------------------------------------------------------------------------


def fake_cgroup(root: Path, limit: str, current: int, inactive_file: int | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    if inactive_file is not None:
        stat = f"anon 1000\nfile {inactive_file + 5}\nactive_file 5\ninactive_file {inactive_file}\nslab 7\n"
        (root / "memory.stat").write_text(stat)
    return root


def test_the_cgroup_room_counts_reclaimable_page_cache_as_room(tmp_path: Path) -> None:
    gib = 2**30
    # 8 GiB limit, 7 GiB charged of which 5 GiB is inactive page cache (the safetensors just read): 6 GiB of room
    root = fake_cgroup(tmp_path / "cache", str(8 * gib), 7 * gib, 5 * gib)
    assert memory.cgroup_room(root) == 6 * gib
    cpu = torch.device("cpu")
    meminfo = memory.available_memory(cpu, tmp_path / "none")  # MemAvailable alone
    assert memory.available_memory(cpu, root) == min(meminfo or 6 * gib, 6 * gib)
    assert memory.cgroup_room(fake_cgroup(tmp_path / "anon", str(8 * gib), 7 * gib, 0)) == 1 * gib
    assert memory.cgroup_room(fake_cgroup(tmp_path / "over", str(gib), 3 * gib, gib)) == 0
    assert memory.cgroup_room(fake_cgroup(tmp_path / "no-stat", str(8 * gib), 7 * gib, None)) == 1 * gib
    assert memory.cgroup_room(fake_cgroup(tmp_path / "unlimited", "max", 7 * gib, 5 * gib)) is None
    assert memory.cgroup_room(tmp_path / "none") is None  # no cgroup v2 here
