"""Batcher: batch sizes, order, lanes, deadlines, errors reaching every waiter, fork restart. No sleeps to pass."""
from __future__ import annotations

import os
import threading
import time

import pytest

from serve.batching import Batcher


class Gate:
    """A batch function that blocks on an Event, so items can be queued behind the first batch."""

    def __init__(self, factor=10):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list] = []
        self.factor = factor

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(10)
        return [x * self.factor for x in items]


@pytest.fixture
def batcher():
    b = Batcher("test")
    yield b
    b.stop()


def test_queued_items_are_gathered_up_to_the_cap(batcher):
    gate = Gate()
    batcher.add_lane("m", gate, max_batch_size=3)
    first = batcher.submit("m", 0)
    assert gate.entered.wait(5)
    rest = batcher.submit_many("m", [1, 2, 3, 4, 5])
    gate.release.set()
    assert [f.result(5) for f in [first, *rest]] == [0, 10, 20, 30, 40, 50]
    assert gate.batches == [[0], [1, 2, 3], [4, 5]]


def test_lanes_batch_separately_on_one_thread(batcher):
    gate_a, gate_b = Gate(10), Gate(100)
    threads = set()

    def tracked(gate):
        return lambda items: (threads.add(threading.get_ident()), gate(items))[1]

    batcher.add_lane("a", tracked(gate_a), max_batch_size=8)
    batcher.add_lane("b", tracked(gate_b), max_batch_size=8)
    blocker = batcher.submit("a", 0)
    assert gate_a.entered.wait(5)
    mixed = [batcher.submit("b", 1), batcher.submit("a", 2), batcher.submit("b", 3), batcher.submit("a", 4)]
    gate_a.release.set()
    gate_b.release.set()
    assert blocker.result(5) == 0
    assert [f.result(5) for f in mixed] == [100, 20, 300, 40]
    assert gate_a.batches == [[0], [2, 4]] and gate_b.batches == [[1, 3]]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_call_runs_on_the_batcher_thread(batcher):
    assert batcher.call(threading.get_ident).result(5) != threading.get_ident()
    assert batcher.call(lambda a, b: a + b, 2, 3).result(5) == 5


def test_an_error_reaches_every_waiter_and_the_thread_survives(batcher):
    gate = Gate(1)

    def fn(items):
        if 0 in items:
            return gate(items)
        if 3 in items:
            raise ValueError("bad batch")
        return items

    batcher.add_lane("m", fn, max_batch_size=4)
    blocker = batcher.submit("m", 0)
    assert gate.entered.wait(5)
    futures = batcher.submit_many("m", [1, 2, 3])
    gate.release.set()
    assert blocker.result(5) == 0
    for future in futures:
        with pytest.raises(ValueError, match="bad batch"):
            future.result(5)
    assert batcher.submit("m", 7).result(5) == 7


def test_wrong_result_count_is_an_error(batcher):
    batcher.add_lane("m", lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
        batcher.submit("m", 1).result(5)


def test_unknown_lane_and_bad_cap(batcher):
    with pytest.raises(KeyError, match="no lane 'x'"):
        batcher.submit("x", 1)
    with pytest.raises(ValueError):
        batcher.add_lane("m", list, max_batch_size=0)


def test_a_lone_item_waits_no_longer_than_the_delay(batcher):
    batcher.add_lane("m", lambda items: items, max_batch_size=8, max_delay_ms=50)
    started = time.monotonic()
    assert batcher.submit("m", "x").result(5) == "x"
    assert time.monotonic() - started < 2.0  # the bound is 50 ms; 2 s only guards against a hang


def test_delay_gathers_items_that_arrive_during_it(batcher):
    sizes = []
    batcher.add_lane("m", lambda items: (sizes.append(len(items)), items)[1], max_batch_size=8, max_delay_ms=10_000)
    futures = [batcher.submit("m", i) for i in range(8)]  # the 8th fills the batch before the delay ends
    assert [f.result(5) for f in futures] == list(range(8))
    assert sizes == [8]


def test_cancelled_items_are_skipped(batcher):
    gate = Gate()
    batcher.add_lane("m", gate, max_batch_size=4)
    first = batcher.submit("m", 0)
    assert gate.entered.wait(5)
    cancelled, kept = batcher.submit_many("m", [1, 2])
    assert cancelled.cancel()
    gate.release.set()
    assert kept.result(5) == 20 and first.result(5) == 0
    assert gate.batches == [[0], [2]]


def test_stop_finishes_queued_work_then_refuses():
    batcher = Batcher()
    gate = Gate()
    batcher.add_lane("m", gate, max_batch_size=1)
    futures = batcher.submit_many("m", [1, 2])
    gate.release.set()
    batcher.stop()
    assert [f.result(5) for f in futures] == [10, 20]
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit("m", 3)


def test_batcher_serves_in_a_forked_child(batcher):
    batcher.add_lane("m", lambda items: [x + 1 for x in items])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's thread is gone; the batcher must have restarted its own
        try:
            os.write(write, str(batcher.submit("m", 41).result(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 16) == b"42"
    os.waitpid(pid, 0)
    assert batcher.submit("m", 1).result(5) == 2
