"""Extract stage library: downloaded clips -> 16 kHz mono audio + a few frames, in shards."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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
                  frame_max_side: int, pool: ThreadPoolExecutor, bar) -> tuple[list[ClipResult], pd.DataFrame]:
    """Decode one shard's clips in parallel (ffmpeg runs out of process, so threads suffice)."""
    def one(row) -> ClipResult:
        result = extract_clip(row.clip_id, clips_dir / Path(row.path).name, frames_per_clip,
                              sample_rate, frame_max_side)
        bar.update(1)
        return result

    results = list(pool.map(one, rows.itertuples(index=False)))
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


def run_extract(download_manifest: Path, clips_dir: Path, out_dir: Path, frames_per_clip: int,
                sample_rate: int, frame_max_side: int, shard_size: int, workers: int) -> pd.DataFrame:
    """All shards; finished shards from an earlier run are kept. Returns the manifest."""
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

    tables = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(None, "extract", total=len(ok_rows)) as bar:
        for name, clip_ids in plan:
            table = shards.finished_table(out_dir, name, clip_ids)
            if table is not None and (out_dir / f"{name}.npz").exists():
                summary.reuse(len(table))
                bar.update(len(table))
            else:
                results, table = extract_shard(by_id.loc[clip_ids], clips_dir, frames_per_clip,
                                               sample_rate, frame_max_side, pool, bar)
                good = [r for r in results if r.status == OK]
                with atomic_path(out_dir / f"{name}.npz") as tmp:
                    extracted.save_shard(tmp, [r.clip_id for r in good], [r.audio for r in good],
                                         [r.frames for r in good], sample_rate)
                shards.write_shard_table(out_dir, name, table)  # last: marks the shard done
                summary.add_statuses(zip(table["status"], table["reason"]))
            tables.append(table.assign(shard=name))
    if upstream_failed:
        summary.skip("download_failed", upstream_failed)
    result = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["clip_id", "youtube_id", "x", "y", "status", "reason", "audio_seconds", "n_frames",
                 "width", "height", "shard"])
    write_table(result, out_dir / "index.csv")
    summary.print()
    return result
