"""The speaker_embeddings stage: extracted 16 kHz audio -> one pretrained speaker embedding per clip.

The backbone is GE2E (speech2face.models.ge2e: resemblyzer's trained weights, loaded from the
installed wheel). Each clip's whole audio, as the extract stage wrote it (not looped or cut
to the spectrogram's 6 s), goes through resemblyzer's preprocessing (volume to -30 dBFS,
long silences cut by WebRTC's VAD) unless ``preprocess`` is off, then ``embed_utterance``:
a 256-D unit vector. A clip with nothing left after the VAD is skipped (``no_voice``).

Files, one shard per extract shard, as the spectrogram stage's (``load_speaker_embeddings``):
  shard-NNNNN.npy   (n_ok, 256) float32; clip ``row`` r of the table is array[r]
  shard-NNNNN.csv   clip_id, row (-1 when skipped), status, reason
  index.csv         all shard tables, in order, with a ``shard`` column
  config.json       backbone, preprocessing, weights file hash and code fingerprint: a change
                    wipes the folder (speech2face.core.shards.reset_if_config_changed)

What it is for: a frozen pretrained backbone's view of the voice, next to the Table-1 CNN
trained from scratch; the evaluation fits a ridge regression from it to the face feature
(``ridge_ge2e``) on the same split.
"""

from __future__ import annotations

import hashlib
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
from speech2face.core.tables import OK, SKIPPED, read_table, write_table
from speech2face.data import extract_files
from speech2face.models import ge2e

TABLE_COLUMNS = ["clip_id", "row", "status", "reason"]
INDEX_COLUMNS = TABLE_COLUMNS + ["shard"]
BACKBONES = ("ge2e",)


@dataclass(frozen=True, kw_only=True)
class SpeakerEmbeddingsConfig(ShardedConfig):
    SECTION: ClassVar[str] = "speaker_embeddings"
    backbone: str = setting("ge2e", choices=BACKBONES)
    preprocess: bool = setting(True)    # resemblyzer's volume normalisation + VAD, as GE2E was trained


def _array_path(folder: Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.npy"


def _skipped_rows(clip_ids: list[str], reason: str) -> pd.DataFrame:
    return pd.DataFrame({"clip_id": clip_ids, "row": -1, "status": SKIPPED, "reason": reason},
                        columns=TABLE_COLUMNS)


def voiced_wav(samples: np.ndarray, preprocess: bool) -> np.ndarray | None:
    """What GE2E embeds of float samples at 16 kHz; None when no voice is left."""
    if not np.any(samples):   # digital silence: the volume normalisation would divide by zero
        return None
    wav = ge2e.preprocess_wav(samples) if preprocess else np.asarray(samples, dtype=np.float32)
    return wav if len(wav) and np.any(wav) else None


def finished_shard(out_dir: Path, shard: Shard) -> pd.DataFrame | None:
    table = shards.finished_table(out_dir, shard.name, shard.clip_ids)
    if table is None or not _array_path(out_dir, shard.name).exists():
        return None
    try:
        array = np.load(_array_path(out_dir, shard.name), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.shape != (int((table["status"] == OK).sum()), ge2e.EMBEDDING_SIZE) or array.dtype != np.float32:
        return None
    return table


def embed_shard(shard: Shard, out_dir: Path, pool: None, bar, extract_dir: Path,
                config: SpeakerEmbeddingsConfig) -> pd.DataFrame:
    """Embeddings of one extract shard -> its table; a shard whose input is missing or
    inconsistent is reported but not written, so a later run retries it."""
    npz_path, clip_ids = Path(extract_dir) / f"{shard.name}.npz", shard.clip_ids
    source, problem = extract_files.open_for_clips(npz_path, clip_ids)
    if source is None:
        bar.update(len(clip_ids))
        return _skipped_rows(clip_ids, problem)
    if len(source) and source.sample_rate != ge2e.SAMPLE_RATE:
        raise ParamsError(f"{npz_path} holds {source.sample_rate} Hz audio; GE2E needs {ge2e.SAMPLE_RATE} Hz: "
                          f"set extract.sample_rate to {ge2e.SAMPLE_RATE}")
    rows, statuses, reasons, wavs = [], [], [], []
    for i in range(len(source)):
        samples = source.audio_float(i)
        wav = voiced_wav(samples, config.preprocess) if len(samples) else None
        statuses.append(OK if wav is not None else SKIPPED)
        reasons.append("" if wav is not None else ("empty_audio" if not len(samples) else "no_voice"))
        rows.append(len(wavs) if wav is not None else -1)
        if wav is not None:
            wavs.append(wav)
    # the whole shard's partials through the LSTM together (GE2EEncoder.embed_utterances)
    array = load_backbone(config.backbone).embed_utterances(wavs)
    bar.update(len(source))
    with atomic_path(_array_path(out_dir, shard.name)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    table = pd.DataFrame({"clip_id": clip_ids, "row": rows, "status": statuses, "reason": reasons},
                         columns=TABLE_COLUMNS)
    shards.write_shard_table(out_dir, shard.name, table)   # last: marks the shard done
    return table


_BACKBONE_CACHE: dict[str, ge2e.GE2EEncoder] = {}


def load_backbone(name: str) -> ge2e.GE2EEncoder:
    """The pretrained network, loaded once per process (shards run one after another)."""
    if name not in _BACKBONE_CACHE:
        _BACKBONE_CACHE[name] = ge2e.load_pretrained_ge2e().freeze().eval()
    return _BACKBONE_CACHE[name]


def weights_sha256() -> str:
    return hashlib.sha256(ge2e.pretrained_weights_path().read_bytes()).hexdigest()


def run_speaker_embeddings(extract_dir: Path, out_dir: Path, config: SpeakerEmbeddingsConfig) -> pd.DataFrame:
    """All extract shards -> embedding shards + index.csv. Returns the index."""
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    load_backbone(config.backbone)   # a missing resemblyzer stops here, in one line, before any work
    planned = extract_files.downstream_shards(extract_dir)
    stage = ShardedStage(
        "speaker_embeddings", out_dir, shards=planned, work=embed_shard, args=(extract_dir, config),
        settings=config, reuse=lambda folder, shard: finished_shard(folder, shard),
        upstream_failure="extract_failed",
        # workers and the engine change how fast, not what: left out
        config={"backbone": config.backbone, "preprocess": config.preprocess, "weights_sha256": weights_sha256(),
                "code": shards.code_fingerprint(sys.modules[__name__], ge2e)})
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.workers)
    try:
        done = run_sharded(stage, INDEX_COLUMNS)
    finally:
        torch.set_num_threads(threads_before)
    write_table(done.index[INDEX_COLUMNS], out_dir / "index.csv")
    done.summary.print()
    return done.index


def load_speaker_embeddings(folder: str | Path) -> dict[str, np.ndarray]:
    """{clip_id: (256,) float32} of every clip the stage embedded."""
    folder = Path(folder)
    index_path = folder / "index.csv"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found (run the speaker_embeddings stage first)")
    index = read_table(index_path)
    ok = index[index["status"] == OK]
    out: dict[str, np.ndarray] = {}
    for shard, rows in ok.groupby("shard", sort=False):
        array = np.load(_array_path(folder, shard), allow_pickle=False)
        if len(array) != len(rows):
            raise ValueError(f"{_array_path(folder, shard)} holds {len(array)} embeddings, index.csv lists "
                             f"{len(rows)}: the folder is inconsistent, rerun the stage")
        out.update({clip_id: array[int(row)] for clip_id, row in zip(rows["clip_id"], rows["row"])})
    return out
