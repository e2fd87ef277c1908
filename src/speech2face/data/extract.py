"""The extract stage: downloaded clips -> 16 kHz mono audio + a few frames, in shards.

``write_extract_shard`` is the unit of work: one whole shard, its npz (format:
speech2face.data.extract_files) and then its table. Clips are decoded in process by
FFmpeg's libraries (``media.decode_clip``, PyAV): starting the ffmpeg program per clip cost
more than the decoding itself. With the local engine the shards run one after another in
this process and ``workers`` crash-isolated processes decode a shard's clips in parallel
(PyAV holds the GIL for much of a decode, so threads would gain little); with the dask
engine each shard is a cluster task that decodes its clips in turn. Shards, reuse and
engines: speech2face.core.runner.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from speech2face.core import shards
from speech2face.core.fsutil import atomic_path
from speech2face.core.params import setting
from speech2face.core.runner import PoolSpec, Shard, ShardedConfig, ShardedStage, run_sharded
from speech2face.core.tables import FAILED, OK, read_table, write_table
from speech2face.core.workers import WorkerPool, in_process_map
from speech2face.data import extract_files, media
from speech2face.data.media import MediaError, decode_clip

INDEX_COLUMNS = ["clip_id", "youtube_id", "x", "y", "status", "reason", "audio_seconds", "n_frames", "width",
                 "height", "shard"]


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ShardedConfig):
    SECTION: ClassVar[str] = "extract"
    sample_rate: int = setting(16000, minimum=1000)
    frames_per_clip: int = setting(3, minimum=1)      # evenly spaced through the segment
    frame_max_side: int = setting(640, minimum=64)    # larger frames are scaled down
    shard_size: int = setting(32, minimum=1)          # clips per output shard


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
    return ClipResult(clip_id, OK, "", audio, [extract_files.encode_jpeg(f) for f in frames],
                      len(audio) / sample_rate, width, height)


def crashed_clip(clip_id: str, *_) -> ClipResult:
    return ClipResult(clip_id, FAILED, "decoder_crashed")


def extract_shard(rows: pd.DataFrame, clips_dir: Path, config: ExtractConfig, pool: WorkerPool | None,
                  bar) -> tuple[list[ClipResult], pd.DataFrame]:
    """Decode one shard's clips on ``pool`` or, without one (a dask task), in turn."""
    calls = [(clip_id, Path(clips_dir) / Path(path).name, config.frames_per_clip, config.sample_rate,
              config.frame_max_side) for clip_id, path in zip(rows["clip_id"], rows["path"])]
    results_in_order = (pool.map(extract_clip, calls, on_crash=crashed_clip) if pool is not None
                        else in_process_map(extract_clip, calls))
    results = []
    for result in results_in_order:
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


def write_extract_shard(shard: Shard, out_dir: Path, pool: WorkerPool | None, bar, clips_dir: Path,
                        config: ExtractConfig) -> pd.DataFrame:
    """One whole shard: its clips decoded, the npz of those that worked, then its table
    (last and atomic: marks the shard done). Returns the table."""
    results, table = extract_shard(shard.rows, clips_dir, config, pool, bar)
    good = [r for r in results if r.status == OK]
    with atomic_path(Path(out_dir) / f"{shard.name}.npz") as tmp:
        extract_files.save_shard(tmp, [r.clip_id for r in good], [r.audio for r in good],
                                 [r.frames for r in good], config.sample_rate)
    shards.write_shard_table(out_dir, shard.name, table)  # last: marks the shard done
    return table


def finished_shard(out_dir: Path, shard: Shard) -> pd.DataFrame | None:
    table = shards.finished_table(out_dir, shard.name, shard.clip_ids)
    return table if table is not None and (Path(out_dir) / f"{shard.name}.npz").exists() else None


def run_extract(download_manifest: Path, clips_dir: Path, out_dir: Path, config: ExtractConfig) -> pd.DataFrame:
    """All shards; finished shards from an earlier run are kept. Writes and returns the index."""
    manifest = read_table(download_manifest)
    ok_rows = manifest[manifest["status"] == OK].reset_index(drop=True)
    by_id = ok_rows.set_index("clip_id", drop=False)
    planned = [Shard(name, by_id.loc[clip_ids].reset_index(drop=True),
                     probe=Path(clips_dir) / Path(by_id.loc[clip_ids[0], "path"]).name)
               for name, clip_ids in shards.plan_shards(list(ok_rows["clip_id"]), config.shard_size)]
    stage = ShardedStage(
        "extract", out_dir, shards=planned, reuse=finished_shard, work=write_extract_shard,
        args=(Path(clips_dir), config), settings=config, pool=PoolSpec(),
        # workers, engine and cluster_address change how fast, not what: left out
        config={"frames_per_clip": config.frames_per_clip, "sample_rate": config.sample_rate,
                "frame_max_side": config.frame_max_side, "shard_size": config.shard_size,
                "code": shards.code_fingerprint(sys.modules[__name__], media, extract_files)})
    done = run_sharded(stage, INDEX_COLUMNS)
    if len(manifest) > len(ok_rows):
        done.summary.skip("download_failed", len(manifest) - len(ok_rows))
    write_table(done.index, Path(out_dir) / "index.csv")
    done.summary.print()
    return done.index
