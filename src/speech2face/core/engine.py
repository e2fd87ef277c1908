"""Where the data stages run their shards: this process (``local``) or a Dask cluster (``dask``).

The extract, spectrogram and faces stages work shard by shard, and a shard is finished when
its table is on disk (written last and atomically, see speech2face.core.shards). That makes a
shard the natural unit of distribution: one task computes one whole shard and writes its
files itself, so workers write in parallel into a shared data folder, nothing large travels
back to the stage (only the shard's table), and a rerun after a crash redoes only the
shards without a table.

Engines (params ``engine`` and ``cluster_address`` of each of these stage sections):

``local`` (default)
    ``InlineExecutor``: each shard runs in the stage process when it is submitted, one after
    another; the stage parallelises *inside* the shard (crash-isolated worker processes in
    extract and faces, speech2face.core.workers; torch threads in spectrogram), so small
    corpora of one or two shards still use every core.
``dask``
    ``DaskExecutor``: shards are tasks on a Dask distributed cluster. With an address
    (``tcp://host:8786``) the stage connects to a running scheduler; with ``null`` it starts
    a ``LocalCluster`` of ``workers`` single-threaded worker processes on this machine (for
    trying it out and for tests: one machine gains nothing over ``local``). Inside a task
    the clips of the shard run one after another: the cluster's parallelism is across
    shards, one per worker thread.

Why Dask: it is a pure pip install (``distributed``), a LocalCluster starts in about two
seconds (so the dask path is tested for real, not mocked), its futures follow
``concurrent.futures`` so a shard task is submitted like any executor call, and workers
can join or leave while a stage runs; a task lost with a dying worker is rerun elsewhere,
which is safe because a shard's files are renamed into place only when complete.

Requirements for a remote cluster: every worker can import the same ``speech2face`` code as
the stage (install the project on the workers, or share the project folder at the same
path: its ``src`` folder is added to each worker's ``sys.path``), and the data folders are
on a filesystem all machines see at the same absolute path. Both are checked before any
task starts: a worker with other code, or one that cannot see the stage's folders, stops
the stage with one line. Shard tasks are functions of the package (speech2face.core.runner), so
workers import them by reference. Dask moves tasks and results with pickle: run the scheduler on a trusted
network (or use Dask's TLS, ``tls://`` addresses).
"""

from __future__ import annotations

import inspect
import re
import threading
from concurrent.futures import Executor, Future, as_completed
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

from speech2face.core.errors import Speech2FaceError
from speech2face.core.params import ParamsError

ENGINES = ("local", "dask")
CONNECT_TIMEOUT_SECONDS = 5
WORKER_WAIT_SECONDS = 10
_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}$")   # host or [IPv6]
SRC_DIR = Path(__file__).resolve().parents[2]   # <root>/src when run from a checkout


class EngineError(Speech2FaceError, RuntimeError):
    """The cluster cannot be used (unreachable, no workers, other code on a worker, a data
    folder the workers do not share). The message is one line."""


# ------------------------------------------------------------------------ params

def check_engine(section: str, engine: Any, cluster_address: Any) -> None:
    """ParamsError (one line) for values the stage cannot work with."""
    if engine not in ENGINES:
        raise ParamsError(f"params.yaml: {section}.engine = {engine!r}: expected one of {list(ENGINES)}")
    if cluster_address is not None and not (isinstance(cluster_address, str) and _ADDRESS.match(cluster_address)):
        raise ParamsError(f"params.yaml: {section}.cluster_address = {cluster_address!r}: expected the "
                          "address of a running dask scheduler (tcp://host:8786) or null")


# --------------------------------------------------------------------- executors

class InlineExecutor(Executor):
    """Runs each submitted call at once in this process and returns its finished future.

    An exception propagates from ``submit`` itself, as from a plain call: the stage stops at
    the first failing shard, as it always has.
    """

    in_process = True

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class DaskExecutor(Executor):
    """``concurrent.futures`` front of a Dask client (and of the LocalCluster it started)."""

    in_process = False

    def __init__(self, address: str | None, workers: int, shared: Sequence[Path] = ()):
        from distributed import Client, LocalCluster

        self._cluster = None
        if address is None:
            # ":0": the scheduler's HTTP server on a free port, so two clusters never collide
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=":0")
            try:
                self._client = Client(self._cluster)
            except BaseException:
                self._cluster.close()
                raise
        else:
            try:
                self._client = Client(address, timeout=f"{CONNECT_TIMEOUT_SECONDS}s")
            except (OSError, TimeoutError) as error:
                raise EngineError(f"cannot reach the dask scheduler at {address} within "
                                  f"{CONNECT_TIMEOUT_SECONDS} s ({_first_line(error)}); start one with "
                                  f"`dask scheduler` and workers with `dask worker {address}`, or set "
                                  "cluster_address: null for a cluster on this machine") from None
        try:
            self._check_workers(address)
            self._check_shared(shared)
        except BaseException:
            self.shutdown()
            raise
        self._executor = self._client.get_executor(pure=False)

    def _check_workers(self, address: str | None) -> None:
        """Workers exist, import speech2face, and run the very code this process runs."""
        try:
            self._client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except (OSError, TimeoutError):
            raise EngineError(f"the dask scheduler at {address} has no workers after {WORKER_WAIT_SECONDS} s "
                              f"(start some with `dask worker {address}`)") from None
        probe = _package_probe()
        _, expected, _ = probe("")
        for worker, (folder, fingerprint, stale) in sorted(self._client.run(probe, str(SRC_DIR)).items()):
            if not folder:
                raise EngineError(f"dask worker {worker} {fingerprint}: install this project on every worker "
                                  "or share the project folder at the same path")
            if fingerprint != expected:
                raise EngineError(f"dask worker {worker} imports speech2face from {folder}, whose code differs "
                                  "from this checkout's: install the same version on every worker")
            if stale:
                raise EngineError(f"dask worker {worker} imported {', '.join(stale)} before the file changed: "
                                  "restart the workers so that they run the current code")

    def _check_shared(self, paths: Sequence[Path]) -> None:
        """Every worker sees these paths (a folder: a marker file written into it now; a path
        absent here is no test and is left out)."""
        import os
        import tempfile

        for path in paths:
            path = Path(path).resolve()
            if not path.exists():
                continue
            marker = None
            if path.is_dir():
                fd, marker = tempfile.mkstemp(prefix=".tmp-engine-", dir=path)   # a rerun sweeps .tmp-*
                os.close(fd)
            try:
                seen = self._client.run(os.path.exists, marker or str(path))
            finally:
                if marker:
                    os.unlink(marker)
            for worker, exists in sorted(seen.items()):
                if not exists:
                    raise EngineError(f"dask worker {worker} cannot see {path}: the data folders must be on a "
                                      "filesystem every worker shares, at the same path")

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        if not _in_package(fn):   # a worker could not import it
            raise TypeError(f"{fn!r}: a dask task must be a module-level function of speech2face")
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the client (and the LocalCluster it started). ``wait=False`` or
        ``cancel_futures`` drops the shard tasks not yet finished."""
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=wait and not cancel_futures)
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __exit__(self, exc_type, exc, traceback) -> bool:
        # After a failed shard, do not wait for the others (they are rerun or reused later).
        self.shutdown(wait=exc_type is None)
        return False


def make_executor(engine: str, address: str | None, workers: int, shared: Sequence[Path] = ()) -> Executor:
    """The executor the stage submits its shard tasks to (see the module notes).

    ``workers`` is the size of the LocalCluster started when engine is dask and address is
    None; a running cluster has the workers it has; local ignores it (the stage's own
    in-shard pool uses it). ``shared``: folders and files every dask worker must see (the
    stage's output folder, an input file), checked before any task is submitted.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {list(ENGINES)}")
    if engine == "local":
        return InlineExecutor()
    return DaskExecutor(address, workers, shared)


# ---------------------------------------------------------------- running shards

class _NoProgress:
    """Stands in for the stage's progress bar inside a remote task (the stage advances its
    bar when the shard's result arrives)."""

    def update(self, n: int = 1) -> None:
        pass


NO_PROGRESS = _NoProgress()


def progress_for_task(executor: Executor, bar):
    """The bar a shard task may update: the stage's own in this process, a no-op remotely."""
    return bar if getattr(executor, "in_process", False) else NO_PROGRESS


def collect(futures: Mapping[str, Future], on_done: Callable[[str, Any], None]) -> dict[str, Any]:
    """Wait for each shard's future; ``on_done(shard, result)`` as each finishes. The first
    failure cancels the shards not yet started and is raised (finished shards stay on disk
    and are reused by the next run)."""
    names = {future: name for name, future in futures.items()}
    results: dict[str, Any] = {}
    try:
        for future in as_completed(names):
            results[names[future]] = future.result()
            on_done(names[future], results[names[future]])
    except BaseException:
        for future in names:
            future.cancel()
        raise
    return results


def collect_shard_tables(futures: Mapping[str, Future], executor: Executor, bar, summary,
                         tables: dict[str, Any], table_of: Callable[[Any], Any] = lambda result: result
                         ) -> dict[str, Any]:
    """``collect`` with the bookkeeping every data stage does per finished shard: advance the
    progress bar (a task in this process advanced it clip by clip already), count the
    table's statuses in the stage summary and keep the table in ``tables``. ``table_of``
    picks the table out of a task's result. Returns the results by shard."""
    def finished(name: str, result: Any) -> None:
        table = table_of(result)
        if not getattr(executor, "in_process", False):
            bar.update(len(table))
        summary.add_statuses(zip(table["status"], table["reason"]))
        tables[name] = table

    return collect(futures, finished)


_PER_PROCESS: dict[Hashable, Any] = {}
_PER_PROCESS_LOCK = threading.Lock()


def once_per_process(key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()`` the first time ``key`` is asked for in this (worker) process, then the same
    object: models a shard task should load once per worker, not once per shard. (This
    module is imported by reference on workers, so the cache outlives a task.)"""
    with _PER_PROCESS_LOCK:
        if key not in _PER_PROCESS:
            _PER_PROCESS[key] = make()
        return _PER_PROCESS[key]


# ------------------------------------------------------------------------ helpers

def _in_package(fn: Callable) -> bool:
    module = getattr(inspect.getmodule(fn), "__name__", "")
    return module.split(".")[0] == "speech2face"


def _package_probe() -> Callable[[str], tuple[str, str, list[str]]]:
    """A function for ``client.run`` on every worker (nested, so that cloudpickle sends it
    by value: it must work on a worker that cannot import speech2face yet).

    ``probe(src)`` puts ``src`` (the stage's <root>/src, "" for none) on sys.path when the
    package is there, imports speech2face and returns (its folder, a hash of its source
    files, the speech2face modules this process imported before their file last changed:
    a long-lived worker would still run their old code).
    """

    def probe(src: str) -> tuple[str, str, list[str]]:
        import hashlib
        import importlib
        import os
        import sys
        import time

        if src and os.path.isdir(os.path.join(src, "speech2face")) and src not in sys.path:
            sys.path.insert(0, src)
        try:
            package = importlib.import_module("speech2face")
        except ImportError as error:
            return "", f"cannot import speech2face ({error})", []
        folder = os.path.dirname(os.path.abspath(package.__file__))
        digest = hashlib.sha256()
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(parent, name)
                    digest.update(os.path.relpath(path, folder).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
        try:
            import psutil

            started = psutil.Process().create_time()
        except Exception:   # no psutil: no staleness check
            started = time.time()
        stale = sorted(name for name, module in list(sys.modules.items())
                       if name.split(".")[0] == "speech2face" and getattr(module, "__file__", None)
                       and os.path.exists(module.__file__)
                       and os.path.getmtime(module.__file__) > started + 2)   # 2 s: clock granularity
        return folder, digest.hexdigest()[:16], stale

    return probe


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
