"""On-disk format of the faces stage (``data/faces/``), its writer's names and its readers.

Per extract shard ``shard-NNNNN`` (only the clips the extract stage could use):
  features-NNNNN.npy    (n_ok, dim) float32   face feature of each usable clip (see meta.json)
  crops-NNNNN.npy       (n_ok, S, S, 3) uint8 aligned RGB face crop (S = crop_size)
  landmarks-NNNNN.npy   (n_ok, 68, 2) float32 dlib's 68 landmarks (x, y) in crop pixels
  shard-NNNNN.csv       clip_id, identity, row (index into the arrays; -1 when skipped),
                        status, reason (no_face | face_far_from_centre | ...),
                        frames_examined, frames_with_face (among those examined),
                        faces_in_frame (most faces the detector found in one examined frame)
and at the end:
  index.csv             all shard tables in order + ``shard`` + ``split`` (train/val/test by
                        identity = YouTube video id; speech2face.data.split)
  meta.json             backend, dim, crop size, detector settings, split settings (with
                        split_by csv: the test CSV's sha256 and number of ids)
  config.json           params + code fingerprint the shards were made with: a change wipes them

Every reader of these files (pairs for the encoder, faces for the decoder, crops for the
reports) goes through ``FaceArrays``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from speech2face.core.fsutil import atomic_path

N_LANDMARKS = 68
TABLE_COLUMNS = ["clip_id", "identity", "row", "status", "reason", "frames_examined",
                 "frames_with_face", "faces_in_frame"]
INDEX_COLUMNS = TABLE_COLUMNS + ["shard", "split"]
ARRAYS = ("features", "crops", "landmarks")


def array_path(faces_dir: str | Path, kind: str, shard: str) -> Path:
    """``<kind>-NNNNN.npy`` of shard ``shard-NNNNN``."""
    return Path(faces_dir) / f"{kind}-{str(shard).removeprefix('shard-')}.npy"


def expected_shapes(n_ok: int, dim: int, crop_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"features": ((n_ok, dim), np.dtype(np.float32)),
            "crops": ((n_ok, crop_size, crop_size, 3), np.dtype(np.uint8)),
            "landmarks": ((n_ok, N_LANDMARKS, 2), np.dtype(np.float32))}


def save_arrays(faces_dir: str | Path, shard: str, arrays: dict[str, np.ndarray]) -> None:
    """A shard's ``ARRAYS``, each written atomically (the shard's table comes after them)."""
    for kind in ARRAYS:
        with atomic_path(array_path(faces_dir, kind, shard)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arrays[kind], allow_pickle=False)


class FaceArrays:
    """The arrays of a faces folder, each shard's opened once, memory-mapped."""

    def __init__(self, faces_dir: str | Path):
        self.faces_dir = Path(faces_dir)
        self._open: dict[tuple[str, str], np.ndarray] = {}

    def array(self, kind: str, shard: str) -> np.ndarray:
        key = (kind, str(shard))
        if key not in self._open:
            self._open[key] = np.load(array_path(self.faces_dir, kind, shard), mmap_mode="r", allow_pickle=False)
        return self._open[key]

    def row(self, kind: str, shard: str, row: int) -> np.ndarray:
        return np.asarray(self.array(kind, shard)[int(row)])

    def gather(self, kind: str, shards: Sequence[str], rows: Sequence[int]) -> list[np.ndarray]:
        """The rows (index.csv's shard and row columns) of one kind, in order."""
        return [self.array(kind, shard)[int(row)] for shard, row in zip(shards, rows)]
