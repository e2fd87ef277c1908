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
from concurrent.futures import Executor, ProcessPoolExecutor
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


def extract_shard(rows: pd.DataFrame, clips_dir: Path, frames_per_clip: int, sample_rate: int,
                  frame_max_side: int, pool: Executor | None, bar) -> tuple[list[ClipResult], pd.DataFrame]:
    """Decode one shard's clips, in parallel on ``pool`` (worker processes: PyAV holds the
    GIL for much of a decode, so threads would gain little) or, without one, in turn."""
    paths = [clips_dir / Path(path).name for path in rows["path"]]
    n = len(paths)
    calls = (pool.map if pool is not None else map)(
        extract_clip, list(rows["clip_id"]), paths, [frames_per_clip] * n, [sample_rate] * n, [frame_max_side] * n)
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
                        sample_rate: int, frame_max_side: int, pool: Executor | None, bar) -> pd.DataFrame:
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
                if executor.in_process and workers > 1:
                    # spawned, not forked: the stage process may hold threads (progress bar)
                    pool = stack.enter_context(ProcessPoolExecutor(
                        workers, mp_context=multiprocessing.get_context("spawn")))
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
