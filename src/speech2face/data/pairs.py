"""Voice/face training pairs: a clip's spectrogram joined with its face feature.

Joins the spectrogram stage's index with the face stage's index on ``clip_id``; only clips
that both stages could use take part. Spectrograms stay memory-mapped on disk; face
features (small) are held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from speech2face.core.tables import OK, read_table
from speech2face.data.face_files import FaceArrays
from speech2face.data.spectrogram_files import open_spectrograms


@dataclass
class Pairs:
    table: pd.DataFrame                 # clip_id, identity, split, spec_shard, spec_row, ...
    spectrograms: dict[str, np.ndarray]  # shard -> memory-mapped (n, frames, freq, 2)
    features: np.ndarray                # (n_pairs, dim) float32, aligned with table rows

    def __len__(self) -> int:
        return len(self.table)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def spectrogram(self, i: int) -> np.ndarray:
        row = self.table.iloc[i]
        return self.spectrograms[row["spec_shard"]][int(row["spec_row"])]

    def subset(self, split: str) -> "Pairs":
        keep = np.flatnonzero(self.table["split"].to_numpy() == split)
        return Pairs(self.table.iloc[keep].reset_index(drop=True), self.spectrograms, self.features[keep])


def load_face_features(faces_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(ok rows of the face index, their features in the same order)."""
    index = read_table(Path(faces_dir) / "index.csv")
    index = index[index["status"] == OK].reset_index(drop=True)
    rows = FaceArrays(faces_dir).gather("features", index["shard"], index["row"])
    dim = rows[0].shape[0] if rows else 0
    return index, np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)


def load_pairs(spectrogram_dir: str | Path, faces_dir: str | Path) -> Pairs:
    spec_index, arrays = open_spectrograms(spectrogram_dir)
    spec_index = spec_index[spec_index["status"] == OK][["clip_id", "shard", "row"]]
    spec_index = spec_index.rename(columns={"shard": "spec_shard", "row": "spec_row"})
    face_index, features = load_face_features(Path(faces_dir))
    face_index = face_index.assign(feature_index=np.arange(len(face_index)))
    table = face_index[["clip_id", "identity", "split", "feature_index"]].merge(spec_index, on="clip_id")
    table = table.sort_values("clip_id", kind="stable").reset_index(drop=True)
    return Pairs(table, arrays, features[table["feature_index"].to_numpy()])


class PairDataset(torch.utils.data.Dataset):
    """(spectrogram (frames, freq, 2) in the stored dtype, feature float32 (dim,)) per pair.

    With ``augment``, each training example is rolled by a random number of frames along
    time: the audio was looped to fill the window, so any rotation is another valid crop of
    the same speech, and the encoder cannot memorise where words fall.
    """

    def __init__(self, pairs: Pairs, augment: bool = False):
        self.pairs = pairs
        self.augment = augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # In the shards' dtype (float16 by default): half the bytes through the loader's
        # copies and worker pipes; the training loop converts on the device (bench_training.py
        # measures the loader both ways).
        spectrogram = np.array(self.pairs.spectrogram(i))
        if self.augment:
            shift = int(torch.randint(0, spectrogram.shape[0], ()).item())
            spectrogram = np.roll(spectrogram, shift, axis=0)
        return torch.from_numpy(spectrogram), torch.from_numpy(self.pairs.features[i])
