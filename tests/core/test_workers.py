"""WorkerPool: a call that kills its process fails alone; a set-up that fails stops with one line."""

from __future__ import annotations

import os

import pytest

from speech2face.core.errors import WorkerError
from speech2face.core.workers import WorkerPool, in_process_map

_factor = None


def set_factor(factor: int) -> None:
    global _factor
    if factor < 0:
        raise RuntimeError("bad set-up")
    _factor = factor


def scaled_or_crash(x: int) -> tuple[int, int]:
    """x * the worker's factor, and the worker's pid; x == 13 kills its process outright."""
    if x == 13:
        os._exit(1)   # no exception to catch: the process is gone, as after a SIGSEGV in a decoder
    return x * _factor, os.getpid()


def crashed(x: int) -> tuple[str, int]:
    return "crashed", x


def test_a_crash_fails_only_its_call_and_the_pool_recovers() -> None:
    with WorkerPool(2, set_factor, (10,)) as pool:
        results = list(pool.map(scaled_or_crash, [(1,), (13,), (2,), (3,)], on_crash=crashed))
        assert [r[0] for r in results] == [10, "crashed", 20, 30]
        assert all(pid != os.getpid() for value, pid in results if value != "crashed")
        again = list(pool.map(scaled_or_crash, [(4,), (5,)], on_crash=crashed))   # a new pool for the next shard
        assert [r[0] for r in again] == [40, 50]


def test_a_failing_set_up_is_one_worker_error() -> None:
    with WorkerPool(2, set_factor, (-1,)) as pool:
        with pytest.raises(WorkerError, match="worker processes could not start"):
            list(pool.map(scaled_or_crash, [(1,)], on_crash=crashed))


def test_no_calls_start_no_processes() -> None:
    pool = WorkerPool(2, set_factor, (-1,))   # would fail if it started
    assert list(pool.map(scaled_or_crash, [], on_crash=crashed)) == []
    assert pool._pool is None


def test_in_process_map_is_the_same_calls_here() -> None:
    set_factor(3)
    assert [r[0] for r in in_process_map(scaled_or_crash, [(1,), (2,)])] == [3, 6]
