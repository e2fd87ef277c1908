"""Extract stage library: downloaded clips -> 16 kHz mono audio + a few frames, in shards.

``write_extract_shard`` is the unit of work: one whole shard, its npz and then its table.
Clips are decoded in process by FFmpeg's libraries (``media.decode_clip``, PyAV): starting
the ffmpeg program per clip cost more than the decoding itself. With the local engine the
shards run one after another in this process and ``workers`` worker processes decode a
shard's clips in parallel; with the dask engine each shard is a cluster task that decodes
its clips in turn (speech2face.engine).
"""

from __future__ import annotations

import contextlib
import sys
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import engine as engines
from . import extracted, media, shards
from .fsutil import atomic_path, remove_stale_temps
from .media import MediaError, decode_clip
from .reporting import StageSummary, progress
from .tables import OK, FAILED, read_table, write_table


@dataclass
class ClipResult:
    clip_id: str
    status: str
    reason: str = ""
    audio: np.ndarray | None = None
    frames: list[bytes] = field(default_factory=list)
    audio_seconds: float = 0.0
    width: int = 0
    height: int = 0


def extract_clip(clip_id: str, path: Path, frames_per_clip: int, sample_rate: int,
                 frame_max_side: int) -> ClipResult:
    """Never raises for a bad clip: the failure is the result."""
    if not path.exists():
        return ClipResult(clip_id, FAILED, "missing_clip_file")
    try:
        audio, frames, _ = decode_clip(path, frames_per_clip, sample_rate, frame_max_side)
    except MediaError as error:
        return ClipResult(clip_id, FAILED, error.reason)
    height, width = frames[0].shape[:2]
    return ClipResult(clip_id, OK, "", audio, [extracted.encode_jpeg(f) for f in frames],
                      len(audio) / sample_rate, width, height)


class DecoderPool:
    """``workers`` spawned processes that decode clips. A clip whose process dies (a decoder
    crash on a hostile file: in-process FFmpeg cannot isolate it the way a crashed ffmpeg
    program was) becomes that clip's failure, not the stage's: the clips the broken pool
    had not answered are retried one per fresh process, and the pool is started again for
    the next shard."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, *iterables, on_crash):
        """Like ``Executor.map``; ``on_crash(*args)`` is the result for a call that crashed."""
        calls = list(zip(*iterables))
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_SPAWN)
        futures = [self._pool.submit(fn, *args) for args in calls]
        for args, future in zip(calls, futures):
            try:
                yield future.result()
            except BrokenProcessPool:
                self.close()   # every unanswered call failed with it; the next shard gets a new pool
                yield self._isolated(fn, args, on_crash)

    @staticmethod
    def _isolated(fn, args, on_crash):
        with ProcessPoolExecutor(1, mp_context=_SPAWN) as one:
            try:
                return one.submit(fn, *args).result()
            except BrokenProcessPool:
                return on_crash(*args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "DecoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# spawned, not forked: the stage process holds threads (progress bar) and FFmpeg state
_SPAWN = multiprocessing.get_context("spawn")


def crashed_clip(clip_id: str, *_) -> ClipResult:
    return ClipResult(clip_id, FAILED, "decoder_crashed")


def extract_shard(rows: pd.DataFrame, clips_dir: Path, frames_per_clip: int, sample_rate: int,
                  frame_max_side: int, pool: DecoderPool | None, bar) -> tuple[list[ClipResult], pd.DataFrame]:
    """Decode one shard's clips on ``pool`` (worker processes: PyAV holds the GIL for much of
    a decode, so threads would gain little, and a process isolates a decoder crash) or,
    without one (a dask task: the task's process is the isolation), in turn."""
    paths = [clips_dir / Path(path).name for path in rows["path"]]
    n = len(paths)
    args = (extract_clip, list(rows["clip_id"]), paths, [frames_per_clip] * n, [sample_rate] * n,
            [frame_max_side] * n)
    calls = pool.map(*args, on_crash=crashed_clip) if pool is not None else map(*args)
    results = []
    for result in calls:
        results.append(result)
        bar.update(1)
    table = pd.DataFrame({
        "clip_id": rows["clip_id"].values,
        "youtube_id": rows["youtube_id"].values,
        "x": rows["x"].values,
        "y": rows["y"].values,
        "status": [r.status for r in results],
        "reason": [r.reason for r in results],
        "audio_seconds": [round(r.audio_seconds, 4) for r in results],
        "n_frames": [len(r.frames) for r in results],
        "width": [r.width for r in results],
        "height": [r.height for r in results],
    })
    return results, table


def write_extract_shard(rows: pd.DataFrame, clips_dir: Path, out_dir: Path, shard: str, frames_per_clip: int,
                        sample_rate: int, frame_max_side: int, pool: DecoderPool | None, bar) -> pd.DataFrame:
    """One whole shard: its clips decoded, the npz of those that worked, then its table
    (last and atomic: marks the shard done). Returns the table."""
    results, table = extract_shard(rows, clips_dir, frames_per_clip, sample_rate, frame_max_side, pool, bar)
    good = [r for r in results if r.status == OK]
    with atomic_path(Path(out_dir) / f"{shard}.npz") as tmp:
        extracted.save_shard(tmp, [r.clip_id for r in good], [r.audio for r in good],
                             [r.frames for r in good], sample_rate)
    shards.write_shard_table(out_dir, shard, table)  # last: marks the shard done
    return table


def run_extract(download_manifest: Path, clips_dir: Path, out_dir: Path, frames_per_clip: int,
                sample_rate: int, frame_max_side: int, shard_size: int, workers: int,
                engine: str = "local", cluster_address: str | None = None) -> pd.DataFrame:
    """All shards; finished shards from an earlier run are kept. Returns the manifest.

    ``engine``/``cluster_address``: where the shards run (speech2face.engine); they change
    how fast, not what, so the config that guards finished shards leaves them out.
    """
    engines.check_engine("extract", engine, cluster_address)
    summary = StageSummary("extract")
    shards.reset_if_config_changed(out_dir, {
        "frames_per_clip": frames_per_clip, "sample_rate": sample_rate,
        "frame_max_side": frame_max_side, "shard_size": shard_size,
        "code": shards.code_fingerprint(sys.modules[__name__], media, extracted)})
    remove_stale_temps(out_dir)
    manifest = read_table(download_manifest)
    ok_rows = manifest[manifest["status"] == OK].reset_index(drop=True)
    upstream_failed = len(manifest) - len(ok_rows)
    plan = shards.plan_shards(list(ok_rows["clip_id"]), shard_size)
    shards.remove_unplanned(out_dir, [name for name, _ in plan])
    by_id = ok_rows.set_index("clip_id", drop=False)

    tables: dict[str, pd.DataFrame] = {}
    pending = {}
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(None, "extract", total=len(ok_rows)))
        executor = pool = None
        for name, clip_ids in plan:
            table = shards.finished_table(out_dir, name, clip_ids)
            if table is not None and (out_dir / f"{name}.npz").exists():
                summary.reuse(len(table))
                bar.update(len(table))
                tables[name] = table
                continue
            if executor is None:   # started only when there is work: a LocalCluster takes seconds
                first_clip = Path(clips_dir) / Path(by_id.loc[clip_ids[0], "path"]).name
                executor = stack.enter_context(engines.make_executor(
                    engine, cluster_address, workers, shared=[out_dir, first_clip]))
                if executor.in_process:   # one worker too: the process isolates a decoder crash
                    pool = stack.enter_context(DecoderPool(workers))
            here = executor.in_process
            pending[name] = executor.submit(
                write_extract_shard, by_id.loc[clip_ids], Path(clips_dir) if here else Path(clips_dir).resolve(),
                Path(out_dir) if here else Path(out_dir).resolve(), name, frames_per_clip, sample_rate,
                frame_max_side, pool, engines.progress_for_task(executor, bar))
        engines.collect_shard_tables(pending, executor, bar, summary, tables)
    if upstream_failed:
        summary.skip("download_failed", upstream_failed)
    result = (pd.concat([tables[name].assign(shard=name) for name, _ in plan], ignore_index=True) if plan
              else pd.DataFrame(columns=["clip_id", "youtube_id", "x", "y", "status", "reason", "audio_seconds",
                                         "n_frames", "width", "height", "shard"]))
    write_table(result, out_dir / "index.csv")
    summary.print()
    return result
