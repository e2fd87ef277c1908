"""On-disk format of the extract stage: one ``shard-NNNNN.npz`` per shard (no pickle).

Arrays in the npz (only clips whose extraction succeeded, in table order):
  clip_ids        str[n]
  audio           int16[sum of samples]   16 kHz mono, all clips concatenated
  audio_offsets   int64[n + 1]            clip i is audio[audio_offsets[i]:audio_offsets[i+1]]
  frames_jpeg     uint8[sum of bytes]     JPEG-encoded RGB frames, all clips concatenated
  frame_offsets   int64[total_frames + 1] byte ranges of each frame in frames_jpeg
  frames_per_clip int32[n]                frames of clip i follow those of clips < i
  sample_rate     int64[]                 scalar

Frames stay JPEG so clips of any frame size fit in one shard and shards stay small.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from speech2face.core import shards
from speech2face.core.errors import MissingInputError
from speech2face.core.fsutil import save_npz
from speech2face.core.runner import Shard
from speech2face.core.tables import OK


def encode_jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes | np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def save_shard(path: str | Path, clip_ids: list[str], audios: list[np.ndarray],
               frames: list[list[bytes]], sample_rate: int) -> None:
    """Write to ``path`` (callers pass a temp path and rename: see fsutil.atomic_path)."""
    audio_offsets = np.zeros(len(audios) + 1, dtype=np.int64)
    audio_offsets[1:] = np.cumsum([len(a) for a in audios])
    flat_frames = [jpeg for clip in frames for jpeg in clip]
    frame_offsets = np.zeros(len(flat_frames) + 1, dtype=np.int64)
    frame_offsets[1:] = np.cumsum([len(j) for j in flat_frames])
    with open(path, "wb") as f:
        save_npz(
            f,
            clip_ids=np.array(clip_ids, dtype=str),
            audio=np.concatenate(audios).astype(np.int16) if audios else np.zeros(0, np.int16),
            audio_offsets=audio_offsets,
            frames_jpeg=np.frombuffer(b"".join(flat_frames), dtype=np.uint8),
            frame_offsets=frame_offsets,
            frames_per_clip=np.array([len(c) for c in frames], dtype=np.int32),
            sample_rate=np.int64(sample_rate),
        )


@dataclass
class ExtractShard:
    clip_ids: list[str]
    sample_rate: int
    _audio: np.ndarray
    _audio_offsets: np.ndarray
    _jpeg: np.ndarray
    _frame_offsets: np.ndarray
    _first_frame: np.ndarray  # index of each clip's first frame

    def __len__(self) -> int:
        return len(self.clip_ids)

    def audio(self, i: int) -> np.ndarray:
        """int16 samples of clip i."""
        return self._audio[self._audio_offsets[i]:self._audio_offsets[i + 1]]

    def audio_float(self, i: int) -> np.ndarray:
        """float32 in [-1, 1)."""
        return self.audio(i).astype(np.float32) / 32768.0

    def frames(self, i: int) -> list[np.ndarray]:
        """Decoded RGB frames (H, W, 3) uint8 of clip i."""
        first, last = self._first_frame[i], self._first_frame[i + 1]
        return [decode_jpeg(self._jpeg[self._frame_offsets[k]:self._frame_offsets[k + 1]])
                for k in range(first, last)]


def load_shard(path: str | Path) -> ExtractShard:
    with np.load(path, allow_pickle=False) as z:
        per_clip = z["frames_per_clip"]
        first = np.zeros(len(per_clip) + 1, dtype=np.int64)
        first[1:] = np.cumsum(per_clip)
        return ExtractShard(
            clip_ids=[str(c) for c in z["clip_ids"]],
            sample_rate=int(z["sample_rate"]),
            _audio=z["audio"],
            _audio_offsets=z["audio_offsets"],
            _jpeg=z["frames_jpeg"],
            _frame_offsets=z["frame_offsets"],
            _first_frame=first,
        )


def open_for_clips(path: str | Path, clip_ids: list[str]) -> tuple[ExtractShard | None, str]:
    """The extract shard at ``path`` if it holds exactly ``clip_ids``, else None and why (a
    reason code for the reading stage's table: the shard is missing, unreadable or not the one
    the extract table describes). The reading stages record the reason and write nothing for
    the shard, so a later run retries it."""
    path = Path(path)
    if not path.exists():
        return None, "missing_extract_shard"
    try:
        source = load_shard(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None, "unreadable_extract_shard"
    if source.clip_ids != list(clip_ids):
        return None, "extract_shard_mismatch"
    return source, ""


def downstream_shards(extract_dir: str | Path) -> list[Shard]:
    """One shard per extract shard, holding the clips the extract stage could use, for the
    stages that read it (spectrogram, faces); the others count as ``upstream_failed``."""
    extract_dir = Path(extract_dir)
    if not extract_dir.is_dir():
        raise MissingInputError(f"{extract_dir} not found (run the extract stage first)")
    planned = []
    for name, extract_table in shards.list_shard_tables(extract_dir):
        ok = extract_table[extract_table["status"] == OK].reset_index(drop=True)
        planned.append(Shard(name, ok, upstream_failed=len(extract_table) - len(ok),
                             probe=extract_dir / f"{name}.npz"))
    return planned
