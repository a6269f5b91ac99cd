"""``consumer.pipeline.Stage``: its contract, tested directly."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest

from consumer.pipeline import Stage


class Refused(Exception):
    pass


def test_items_are_processed_one_at_a_time_in_submission_order() -> None:
    done: list[int] = []
    running = threading.Lock()

    def work(item: int) -> None:
        assert running.acquire(blocking=False), "two items at once"
        done.append(item)
        running.release()

    stage: Stage[int] = Stage("test", work)
    for i in range(500):
        stage.submit(i)
    stage.flush()
    assert done == list(range(500))
    stage.close()


def test_flush_returns_once_every_submitted_item_is_done() -> None:
    release = threading.Event()
    done: list[int] = []

    def work(item: int) -> None:
        if item == 0:
            release.wait()
        done.append(item)

    stage: Stage[int] = Stage("test", work, depth=4)
    for i in range(3):
        stage.submit(i)
    release.set()
    stage.flush()
    assert done == [0, 1, 2]
    stage.close()


def failing_at(n: int, failure: Exception, done: list[int]) -> Callable[[int], None]:
    """Work that records items, raises ``failure`` at item ``n`` and another error at
    every later one (a stage that ran them would report that one instead)."""

    def work(item: int) -> None:
        if item == n:
            raise failure
        if item > n:
            raise Refused(f"item {item}: a later failure, never reached")
        done.append(item)

    return work


def test_the_first_failure_is_raised_by_the_next_submit_and_later_items_are_dropped() -> None:
    failure = Refused("item 3")
    done: list[int] = []
    stage: Stage[int] = Stage("test", failing_at(3, failure, done))
    with pytest.raises(Refused) as caught:
        for i in itertools.count():  # submit blocks while the queue is full
            stage.submit(i)
    assert caught.value is failure
    calls: list[Callable[[], None]] = [lambda: stage.submit(99), stage.flush, stage.close]
    for call in calls:
        with pytest.raises(Refused) as again:
            call()
        assert again.value is failure
    assert done == [0, 1, 2]


def test_the_first_failure_is_raised_by_flush_and_by_close() -> None:
    failure = Refused("item 1")
    done: list[int] = []
    stage: Stage[int] = Stage("test", failing_at(1, failure, done), depth=8)
    for i in range(6):
        stage.submit(i)
    with pytest.raises(Refused) as caught:
        stage.flush()
    assert caught.value is failure
    with pytest.raises(Refused) as at_close:
        stage.close()
    assert at_close.value is failure
    assert done == [0]


def test_close_finishes_what_was_submitted_and_refuses_more() -> None:
    done: list[int] = []
    stage: Stage[int] = Stage("test", done.append)
    for i in range(10):
        stage.submit(i)
    stage.close()
    assert done == list(range(10))
    stage.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        stage.submit(10)
