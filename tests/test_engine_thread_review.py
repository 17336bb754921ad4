"""EngineThread, from a review: a cancelled stream gets the tail held back for its stop strings, the max_wait_ms
hold ends once the rows the memory plan bought are waiting or a waiting request's deadline passes, and
`requests_failed` counts the requests that fail in the thread's intake."""

from __future__ import annotations

import time

import pytest

from helpers.engine_threads import EngineHarness
from helpers.tiny_model import chat_prompt, tiny_model
from inference_worker.engine import EngineConfig, Event, Failed, Finished, TokenDelta
from inference_worker.model_loader import LoadedModel
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence

WAIT_S = 60  # far below the 600 s hold of the max_wait_ms test: a hold that does not end fails here
SHORT = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


def test_a_cancelled_stream_gets_the_text_held_back_for_its_stop_strings(tiny: LoadedModel) -> None:
    """The deltas of a stream cancelled mid-flight add up to its Finished text: the tail that could still have
    started "zzzzzz" goes out before the Finished."""
    harness: EngineHarness

    def cancel_after_the_first_delta(events: list[Event]) -> None:
        if any(isinstance(e, TokenDelta) for e in events):
            harness.thread.cancel("s")  # queued from the engine thread: applied before its next step

    harness = EngineHarness(tiny, EngineConfig(max_batch_size=4), cancel_after_the_first_delta)
    params = SamplingParams(max_tokens=900, ignore_eos=True, stop=("zzzzzz",))
    harness.thread.submit(Sequence("s", chat_prompt(tiny, "stream then cancel"), params, stream=True))
    events = harness.until_final("s")
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "cancelled"
    deltas = [e.text for e in events if isinstance(e, TokenDelta)]
    assert len(deltas) >= 2 and "".join(deltas) == finished.text
    harness.thread.stop(WAIT_S)


def test_the_hold_ends_when_the_rows_the_memory_plan_bought_are_waiting(tiny: LoadedModel) -> None:
    """max_batch_size 4, but kv_cache_tokens buys 2 rows: two waiting requests fill what can run, so the engine
    does not hold them for the 600 s of max_wait_ms."""
    window = 256
    config = EngineConfig(
        max_batch_size=4, max_seq_len=window, prefix_cache=False, kv_cache_tokens=2 * window, max_wait_ms=600_000
    )
    harness = EngineHarness(tiny, config)
    assert harness.engine.plan.rows == 2
    harness.thread.submit(Sequence("a", chat_prompt(tiny, "a"), SHORT))
    harness.thread.submit(Sequence("b", chat_prompt(tiny, "b"), SHORT))
    finals = harness.finals({"a", "b"})
    assert all(isinstance(e, Finished) for e in finals.values())
    harness.thread.stop(WAIT_S)


def test_a_request_whose_deadline_passes_during_the_hold_is_answered_504(tiny: LoadedModel) -> None:
    """max_wait_ms holds a lone request 600 s for company; its 0.5 s deadline ends the hold, and the step answers 504
    (the hold used to run its course first)."""
    harness = EngineHarness(tiny, EngineConfig(max_batch_size=4, max_seq_len=256, max_wait_ms=600_000))
    hurried = Sequence("hurried", chat_prompt(tiny, "a"), SHORT)
    hurried.deadline = time.monotonic() + 0.5
    harness.thread.submit(hurried)
    (final,) = harness.finals({"hurried"}).values()
    assert isinstance(final, Failed) and final.code == 504, final
    harness.thread.stop(WAIT_S)


def test_requests_failed_counts_every_failure_of_the_intake_once(tiny: LoadedModel) -> None:
    """A preparation that refuses (400), one that raises (500) and a prompt too long for the window (413, counted
    by add_request itself) are three failed requests."""
    harness = EngineHarness(tiny, EngineConfig(max_batch_size=4, max_seq_len=16))

    def raises() -> Sequence:
        raise RuntimeError("template exploded")

    harness.thread.submit(lambda: Failed("refused", 400, "bad input"), "refused")
    harness.thread.submit(raises, "raises")
    harness.thread.submit(Sequence("long", list(range(100, 140)), SHORT))
    finals = harness.finals({"refused", "raises", "long"})
    assert {rid: e.code for rid, e in finals.items() if isinstance(e, Failed)} == {
        "refused": 400,
        "raises": 500,
        "long": 413,
    }
    assert harness.engine.snapshot()["requests_failed"] == 3
    harness.thread.stop(WAIT_S)
