"""The serving process's garbage collector (`llmbus/process_gc.py`): off while it starts, then one collection and
the survivors frozen. The whole process is tested in test_cli.py (`llmbus up` logs the settling once)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from llmbus import process_gc


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The test process's collector as it was: on, nothing frozen (frozen objects would never be collected)."""
    assert gc.isenabled()
    try:
        yield
    finally:
        process_gc.resume()
        gc.unfreeze()
        gc.enable()


def test_the_collector_is_off_until_settled_then_collects_freezes_and_is_on_again(restored_collector: None) -> None:
    process_gc.pause()
    assert not gc.isenabled()
    garbage = weakref.ref(Node())
    kept = Node()
    for _ in range(5000):  # far past the first generation's threshold: with the collector on, this would free it
        Node().me = None
    assert garbage() is not None
    frozen_before = gc.get_freeze_count()

    process_gc.settle()

    assert gc.isenabled()
    assert garbage() is None
    assert gc.get_freeze_count() > frozen_before
    assert kept.me is kept
    assert all(obj is not kept for obj in gc.get_objects())  # in the permanent generation, which no collection walks


def test_settling_twice_or_without_a_pause_leaves_the_collector_alone(restored_collector: None) -> None:
    process_gc.settle()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    process_gc.pause()
    process_gc.settle()
    frozen = gc.get_freeze_count()
    process_gc.settle()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_process_that_stops_before_its_parts_are_ready_gets_its_collector_back(restored_collector: None) -> None:
    process_gc.pause()
    process_gc.resume()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    process_gc.settle()  # no longer paused: nothing to settle
    assert gc.get_freeze_count() == 0


def test_what_exists_when_the_imports_are_done_is_frozen_uncollected_and_settling_collects_only_what_came_after(
    restored_collector: None,
) -> None:
    process_gc.pause()
    import_garbage = weakref.ref(Node())
    process_gc.freeze_imports()
    assert not gc.isenabled()
    later_garbage = weakref.ref(Node())

    process_gc.settle()

    assert import_garbage() is not None  # kept: the start's imports leave about 7.8 MB of it, once
    assert later_garbage() is None
    assert gc.isenabled()


def test_freezing_the_imports_without_a_pause_does_nothing(restored_collector: None) -> None:
    process_gc.freeze_imports()
    assert gc.get_freeze_count() == 0
