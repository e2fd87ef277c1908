"""Crash-isolated worker processes for the per-clip work of the data stages.

Decoding a hostile file (FFmpeg's libraries, in process) or running dlib on a strange frame
can kill the process that does it. ``WorkerPool`` runs each call in one of ``workers``
spawned processes, so such a crash fails one clip, never the stage: when the pool breaks,
the calls it had not answered are rerun one per fresh process, and a call that kills its
own process too gets ``on_crash(*args)`` as its result. The next ``map`` starts a new pool.

Spawned, not forked: the stage process holds threads (progress bar, torch) and FFmpeg
state. An ``initializer`` (e.g. loading dlib's models) runs once in every worker; when it
fails, the pool cannot start and ``WorkerError`` stops the stage with one line (instead of
every clip "crashing" in turn).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Sequence

from speech2face.core.errors import WorkerError

_SPAWN = multiprocessing.get_context("spawn")


def _ready() -> bool:
    return True


class WorkerPool:
    def __init__(self, workers: int, initializer: Callable | None = None, initargs: Sequence = ()):
        self.workers = workers
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, mp_context=_SPAWN, initializer=self.initializer,
                                   initargs=self.initargs)
        if self.initializer is not None:
            try:
                pool.submit(_ready).result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                raise WorkerError("worker processes could not start: their set-up failed (see the error "
                                  "above); a rerun resumes after the finished shards") from None
        return pool

    def map(self, fn: Callable, calls: Iterable[tuple], on_crash: Callable[..., Any]) -> Iterator[Any]:
        """``fn(*args)`` for each args tuple in ``calls``, results in order."""
        calls = list(calls)
        if not calls:
            return
        if self._pool is None:
            self._pool = self._new_pool(self.workers)
        futures = []
        for args in calls:
            try:
                futures.append(self._pool.submit(fn, *args))
            except BrokenProcessPool:   # an early call crashed while the later ones were being queued
                break
        for i, args in enumerate(calls):
            if i < len(futures):
                try:
                    yield futures[i].result()
                    continue
                except BrokenProcessPool:
                    pass
            self.close()   # every unanswered call failed with the pool; the next map gets a new one
            yield self._isolated(fn, args, on_crash)

    def _isolated(self, fn: Callable, args: tuple, on_crash: Callable[..., Any]) -> Any:
        pool = self._new_pool(1)
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            return on_crash(*args)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_process_map(fn: Callable, calls: Iterable[tuple]) -> Iterator[Any]:
    """The same calls in this process (a dask task: the task's process is the isolation)."""
    for args in calls:
        yield fn(*args)
