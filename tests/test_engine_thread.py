"""EngineThread: the watchdog (faults injected into the tiny model's forward, add_request, the sink and fail_all),
intake by callable, the Accepted event and per-thread torch threads."""

from __future__ import annotations

import threading

import pytest

from helpers.engine_threads import WAIT_S, EngineHarness, Fault, Faulty
from helpers.tiny_model import chat_prompt, tiny_model
from inference_worker.engine import Accepted, Failed, Finished
from inference_worker.model_loader import LoadedModel
from inference_worker.sampling_params import SamplingParams
from inference_worker.sequence import Sequence

SHORT = SamplingParams(max_tokens=4, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model()


def test_a_failing_forward_fails_what_is_in_flight_and_the_thread_serves_on(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.engine.runner.forward.arm()
    h.thread.submit(Sequence("a", chat_prompt(tiny, "a"), SHORT))
    failed = h.final("a")
    assert isinstance(failed, Failed) and failed.code == 500 and "injected" in failed.message
    h.thread.submit(Sequence("b", chat_prompt(tiny, "b"), SHORT))
    assert isinstance(h.final("b"), Finished)
    assert h.thread.alive and not h.deaths
    h.thread.stop(WAIT_S)


def test_a_failing_add_request_fails_only_that_request(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.engine.add_request = Faulty(h.engine.add_request)
    h.thread.submit(Sequence("long", chat_prompt(tiny, "long"), LONG, stream=True))
    assert h.first_event("long") == Accepted("long")
    h.engine.add_request.arm()
    h.thread.submit(Sequence("bad", chat_prompt(tiny, "bad"), SHORT))
    failed = h.final("bad")
    assert isinstance(failed, Failed) and failed.code == 500
    h.thread.submit(Sequence("good", chat_prompt(tiny, "good"), SHORT))
    assert isinstance(h.final("good"), Finished)
    h.thread.cancel("long")
    assert h.final("long").finish_reason == "cancelled"
    assert h.thread.alive and not h.deaths
    h.thread.stop(WAIT_S)


def test_a_failing_sink_kills_the_thread_which_fails_what_it_holds_and_reports_its_death(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.thread.submit(Sequence("held", chat_prompt(tiny, "held"), LONG, stream=True))
    assert h.first_event("held") == Accepted("held")
    h.sink.arm()  # the next delivery raises: events can no longer be delivered, so the engine cannot go on
    assert h.died.wait(WAIT_S)
    assert isinstance(h.deaths[0], Fault) and not h.thread.alive
    failed = h.final("held")
    assert isinstance(failed, Failed) and failed.code == 500 and "stopped" in failed.message
    h.thread.submit(Sequence("late", chat_prompt(tiny, "late"), SHORT))
    late = h.final("late")
    assert isinstance(late, Failed) and late.code == 500


def test_when_failing_everything_raises_too_the_thread_answers_from_its_own_records(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.thread.submit(Sequence("one", chat_prompt(tiny, "one"), LONG))
    h.thread.submit(Sequence("two", chat_prompt(tiny, "two"), LONG))
    h.engine.fail_all = Faulty(h.engine.fail_all)
    h.engine.fail_all.arm()
    h.engine.runner.forward.arm()
    assert h.died.wait(WAIT_S)
    finals = h.finals({"one", "two"})
    assert all(isinstance(e, Failed) and e.code == 500 for e in finals.values())


def test_a_callable_builds_the_request_in_the_engine_thread(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    built_in: list[str] = []

    def build() -> Sequence:
        built_in.append(threading.current_thread().name)
        return Sequence("c", chat_prompt(tiny, "built late"), SHORT)

    h.thread.submit(build, "c")
    assert isinstance(h.final("c"), Finished) and built_in == ["llmbus-engine"]
    h.thread.submit(lambda: Failed("refused", 400, "bad input"), "refused")
    assert h.final("refused") == Failed("refused", 400, "bad input")
    h.thread.submit(lambda: 1 / 0, "raises")
    raised = h.final("raises")
    assert isinstance(raised, Failed) and raised.code == 500 and "ZeroDivisionError" in raised.message
    with pytest.raises(ValueError):
        h.thread.submit(build)
    h.thread.stop(WAIT_S)


def test_what_the_commands_before_a_stop_produced_still_goes_out(tiny: LoadedModel) -> None:
    """A refusal read in the same pass as the stop is answered as it is, not left for the worker's 503."""
    h = EngineHarness(tiny)
    building, release = threading.Event(), threading.Event()

    def slow_build() -> Failed:
        building.set()
        release.wait(WAIT_S)
        return Failed("first", 400, "bad input")

    h.thread.submit(slow_build, "first")
    assert building.wait(WAIT_S)  # the engine thread is inside the first command; the next two queue behind it
    h.thread.submit(lambda: Failed("second", 400, "also bad"), "second")
    stopping = threading.Thread(target=h.thread.stop, args=(WAIT_S,))
    stopping.start()
    while h.thread.inbox.qsize() < 2:  # the second command and the stop are both queued
        threading.Event().wait(0.001)
    release.set()
    stopping.join(WAIT_S)
    assert h.finals({"first", "second"}) == {
        "first": Failed("first", 400, "bad input"),
        "second": Failed("second", 400, "also bad"),
    }


def test_a_stream_is_accepted_before_its_first_token_and_a_plain_request_is_not(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.thread.submit(Sequence("s", chat_prompt(tiny, "stream"), SHORT, stream=True))
    assert h.first_event("s") == Accepted("s")
    h.thread.submit(Sequence("p", chat_prompt(tiny, "plain"), SHORT))
    assert isinstance(h.first_event("p"), Finished)
    h.thread.stop(WAIT_S)


def test_set_threads_applies_in_the_engine_thread(tiny: LoadedModel) -> None:
    h = EngineHarness(tiny)
    h.thread.set_threads(1)
    h.thread.submit(Sequence("t", chat_prompt(tiny, "threads"), SHORT))
    h.final("t")
    assert h.thread.threads == 1
    with pytest.raises(ValueError):
        h.thread.set_threads(0)
    h.thread.stop(WAIT_S)
