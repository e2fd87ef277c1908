"""The one driver of the sharded data stages (extract, spectrogram, faces).

A stage describes its work as a ``ShardedStage``: the output folder, the config that made
its files (params + code fingerprint), the shards to hold (clip rows each), how to tell a
finished shard (``reuse``) and the function that computes one (``work``). ``run_sharded``
then does the rest, the same way for every stage:

1. wipe the folder when the config changed (outputs persist across runs for resume),
   sweep half-written files and shards no longer planned;
2. per shard: keep it when ``reuse`` finds it finished, else submit ``work`` to the engine
   (speech2face.core.engine): in this process, its clips on a crash-isolated
   ``WorkerPool`` (speech2face.core.workers) when the stage asks for one, or as a task on a
   Dask cluster (paths resolved to absolute, no pool: the task's process isolates);
3. collect each shard's table as it finishes (progress bar, summary counts) and return the
   index: every table in shard order with a ``shard`` column.

``work(shard, out_dir, pool, bar, *args)`` writes the shard's files atomically and its table
last (speech2face.core.shards), and returns the table or ``(table, extra)``. It must be a
module-level function of the package so that a dask worker can import it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import pandas as pd

from speech2face.core import engine as engines
from speech2face.core import shards
from speech2face.core.fsutil import remove_stale_temps
from speech2face.core.params import setting
from speech2face.core.reporting import StageSummary, progress
from speech2face.core.workers import WorkerPool


@dataclass(frozen=True, kw_only=True)
class ShardedConfig:
    """Settings every sharded stage has: they change how fast, never what."""

    SECTION: ClassVar[str] = ""
    workers: int = setting(2, minimum=1)            # worker processes (dask: LocalCluster size)
    engine: str = setting("local", choices=engines.ENGINES)
    cluster_address: str | None = setting(None)     # a running dask scheduler; null: a LocalCluster here

    def check(self) -> None:
        engines.check_engine(self.SECTION, self.engine, self.cluster_address)


@dataclass
class Shard:
    name: str                       # shard-NNNNN
    rows: pd.DataFrame              # the upstream rows of the clips it holds (a clip_id column)
    upstream_failed: int = 0        # clips of this shard the upstream stage could not use
    probe: Path | None = None       # a file it reads: dask workers must see it

    @property
    def clip_ids(self) -> list[str]:
        return list(self.rows["clip_id"])


@dataclass
class PoolSpec:
    """Worker processes for the clips of a shard (local engine)."""
    initializer: Callable | None = None
    initargs: tuple = ()


@dataclass
class ShardedStage:
    name: str
    out_dir: Path
    config: dict                                # a change wipes out_dir
    shards: list[Shard]
    reuse: Callable[[Path, Shard], pd.DataFrame | None]
    work: Callable[..., Any]
    settings: ShardedConfig
    args: tuple = ()
    upstream_failure: str = "upstream_failed"   # summary reason of Shard.upstream_failed
    pool: PoolSpec | None = None                # None: the work runs in this process
    shared: Sequence[Path] = ()                 # more files dask workers must see (model weights)
    summary: StageSummary = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.summary = StageSummary(self.name)


@dataclass
class ShardedResult:
    index: pd.DataFrame                 # all shard tables in order, with a shard column
    extras: dict[str, Any]              # shard -> the extra its work returned (computed shards only)
    summary: StageSummary


def run_sharded(stage: ShardedStage, empty_columns: Sequence[str]) -> ShardedResult:
    """Every shard of ``stage`` reused or computed; ``empty_columns``: the index's columns
    when there are no shards at all."""
    out_dir, summary = stage.out_dir, stage.summary
    shards.reset_if_config_changed(out_dir, stage.config)
    remove_stale_temps(out_dir)
    shards.remove_unplanned(out_dir, [shard.name for shard in stage.shards])

    tables: dict[str, pd.DataFrame] = {}
    pending = {}
    total = sum(len(shard.rows) for shard in stage.shards)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(None, stage.name, total=total))
        executor = pool = None
        for shard in stage.shards:
            if shard.upstream_failed:
                summary.skip(stage.upstream_failure, shard.upstream_failed)
            table = stage.reuse(out_dir, shard)
            if table is not None:
                summary.reuse(len(table))
                bar.update(len(table))
                tables[shard.name] = table
                continue
            if executor is None:   # started only when there is work: a LocalCluster takes seconds
                shared = [out_dir] + ([shard.probe] if shard.probe else []) + list(stage.shared)
                executor = stack.enter_context(engines.make_executor(
                    stage.settings.engine, stage.settings.cluster_address, stage.settings.workers, shared))
                if executor.in_process and stage.pool is not None:
                    pool = stack.enter_context(WorkerPool(stage.settings.workers, stage.pool.initializer,
                                                          stage.pool.initargs))
            if executor.in_process:
                pending[shard.name] = executor.submit(stage.work, shard, out_dir, pool, bar, *stage.args)
            else:
                args = tuple(arg.resolve() if isinstance(arg, Path) else arg for arg in stage.args)
                pending[shard.name] = executor.submit(stage.work, shard, out_dir.resolve(), None,
                                                      engines.NO_PROGRESS, *args)
        results = engines.collect_shard_tables(pending, executor, bar, summary, tables, table_of=_table_of)
    extras = {name: result[1] for name, result in results.items() if isinstance(result, tuple)}
    index = (pd.concat([tables[shard.name].assign(shard=shard.name) for shard in stage.shards], ignore_index=True)
             if stage.shards else pd.DataFrame(columns=list(empty_columns)))
    return ShardedResult(index, extras, summary)


def _table_of(result: Any) -> pd.DataFrame:
    return result[0] if isinstance(result, tuple) else result
