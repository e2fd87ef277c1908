"""The spectrogram stage: extracted 16 kHz audio -> compressed STFTs, one shard per extract shard.

One memory-mappable ``.npy`` per extract shard (format: speech2face.data.spectrogram_files;
the STFT itself: speech2face.data.audio). ``compute_shard`` is the unit of work: with the
local engine the shards run in this process, one after another, with ``workers`` torch
threads; with the dask engine each shard is a task on the cluster (speech2face.core.runner).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from speech2face.core import shards
from speech2face.core.fsutil import atomic_path
from speech2face.core.params import ParamsError, setting
from speech2face.core.runner import Shard, ShardedConfig, ShardedStage, run_sharded
from speech2face.core.tables import OK, SKIPPED, write_table
from speech2face.data import audio, extract_files, spectrogram_files
from speech2face.data.audio import STORAGE_DTYPES, SpectrogramSettings, spectrogram_batch
from speech2face.data.spectrogram_files import INDEX_COLUMNS, TABLE_COLUMNS, array_path, open_array


@dataclass(frozen=True, kw_only=True)
class SpectrogramConfig(ShardedConfig):
    SECTION: ClassVar[str] = "spectrogram"
    seconds: float = setting(6.0, minimum=0.05)     # audio repeated to at least this, then cut to it
    sample_rate: int = setting(16000, minimum=1000)
    window: int = setting(400, minimum=2)           # 25 ms periodic Hann
    hop: int = setting(160, minimum=1)              # 10 ms
    n_fft: int = setting(512, minimum=2)            # 257 frequencies
    power: float = setting(0.3, minimum=0.01)       # sgn(S)|S|^power on real and imaginary parts
    dtype: str = setting("float16", choices=STORAGE_DTYPES)   # on-disk dtype of the shards
    batch_size: int = setting(32, minimum=1)

    def settings(self) -> SpectrogramSettings:
        return SpectrogramSettings(self.seconds, self.sample_rate, self.window, self.hop, self.n_fft, self.power)

    def check(self) -> None:
        super().check()
        self.settings().validate()


def finished_shard(out_dir: Path, shard: Shard, config: SpectrogramConfig) -> pd.DataFrame | None:
    """The shard's table if the shard was finished for these clips and its array is intact."""
    table = shards.finished_table(out_dir, shard.name, shard.clip_ids)
    if table is None or not array_path(out_dir, shard.name).exists():
        return None
    try:
        array = open_array(array_path(out_dir, shard.name))
    except (OSError, ValueError):
        return None
    n_ok = int((table["status"] == OK).sum())
    if array.shape != (n_ok, *config.settings().shape) or array.dtype != np.dtype(config.dtype):
        return None
    return table


def _skipped_rows(clip_ids: list[str], reason: str) -> pd.DataFrame:
    return pd.DataFrame({"clip_id": clip_ids, "row": -1, "status": SKIPPED, "reason": reason,
                         "source_seconds": 0.0}, columns=TABLE_COLUMNS)


def compute_shard(shard: Shard, out_dir: Path, pool: None, bar, extract_dir: Path,
                  config: SpectrogramConfig) -> pd.DataFrame:
    """Spectrograms of one extract shard -> its table. A shard whose input is missing or
    inconsistent is reported in the table returned but not written, so a later run retries it."""
    npz_path, clip_ids = Path(extract_dir) / f"{shard.name}.npz", shard.clip_ids
    settings, dtype, batch_size = config.settings(), np.dtype(config.dtype), config.batch_size
    source, problem = extract_files.open_for_clips(npz_path, clip_ids)
    if source is None:
        bar.update(len(clip_ids))
        return _skipped_rows(clip_ids, problem)
    if len(source) and source.sample_rate != settings.sample_rate:
        # Resampling is the extract stage's job: two sample rates mean inconsistent params.
        raise ParamsError(f"{npz_path} holds {source.sample_rate} Hz audio but spectrogram.sample_rate = "
                          f"{settings.sample_rate}: set extract.sample_rate and spectrogram.sample_rate equal")

    rows, statuses, reasons, seconds, usable = [], [], [], [], []
    for i in range(len(source)):
        samples = source.audio(i)
        seconds.append(round(len(samples) / source.sample_rate, 4))
        # Looping cannot make something from nothing; all-zero audio (digital silence)
        # carries no voice, and would teach the encoder a face for silence.
        reason = "empty_audio" if len(samples) == 0 else ("silent_audio" if not np.any(samples) else "")
        statuses.append(SKIPPED if reason else OK)
        reasons.append(reason)
        rows.append(-1 if reason else len(usable))
        if not reason:
            usable.append(i)
    if len(usable) < len(source):
        bar.update(len(source) - len(usable))

    shape = (len(usable), *settings.shape)
    with atomic_path(array_path(out_dir, shard.name)) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        for start in range(0, len(usable), batch_size):
            batch = usable[start:start + batch_size]
            array[start:start + len(batch)] = spectrogram_batch(
                [source.audio_float(i) for i in batch], settings).astype(dtype)
            bar.update(len(batch))
        array.flush()
        del array  # close the map before the rename
    table = pd.DataFrame({"clip_id": clip_ids, "row": rows, "status": statuses, "reason": reasons,
                          "source_seconds": seconds}, columns=TABLE_COLUMNS)
    shards.write_shard_table(out_dir, shard.name, table)  # last: marks the shard done
    return table


def run_spectrogram(extract_dir: Path, out_dir: Path, config: SpectrogramConfig) -> pd.DataFrame:
    """All extract shards -> spectrogram shards + index.csv. Returns the index."""
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    planned = extract_files.downstream_shards(extract_dir)
    stage = ShardedStage(
        "spectrogram", out_dir, shards=planned, work=compute_shard, args=(extract_dir, config), settings=config,
        reuse=lambda folder, shard: finished_shard(folder, shard, config), upstream_failure="extract_failed",
        # batch_size, workers and the engine change how fast, not what: left out
        config={**config.settings().as_dict(), "dtype": config.dtype,
                "code": shards.code_fingerprint(sys.modules[__name__], audio, spectrogram_files)})
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.workers)
    try:
        done = run_sharded(stage, INDEX_COLUMNS)
    finally:
        torch.set_num_threads(threads_before)
    write_table(done.index[INDEX_COLUMNS], out_dir / "index.csv")
    done.summary.print()
    return done.index
