"""Face-stage outputs as decoder training data, and the decoder's targets.

``load_faces`` joins the face index (ok rows) with the per-shard arrays: aligned crops,
68 landmarks (crop pixels) and features. The shards are opened memory-mapped and only the
ok rows are copied into memory (training then holds float32 textures, 4x the crops' size).

Targets (Cole et al. 2017):
- the mean landmarks over the training faces (fractions of the crop side);
- each face's *texture*: its crop warped from its own landmarks to the mean landmarks, so
  that all textures share one geometry and the decoder's convolutional branch only models
  appearance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from speech2face.core.errors import DataError
from speech2face.core.tables import OK, read_table
from speech2face.data.face_files import FaceArrays
from speech2face.models.warp import sparse_image_warp


@dataclass
class Faces:
    table: pd.DataFrame          # clip_id, identity, split (ok rows of the face index)
    crops: np.ndarray            # (n, S, S, 3) uint8
    landmarks: np.ndarray        # (n, 68, 2) float32, crop pixels
    features: np.ndarray         # (n, dim) float32

    def __len__(self) -> int:
        return len(self.table)

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[1])

    def subset(self, split: str) -> "Faces":
        keep = np.flatnonzero(self.table["split"].to_numpy() == split)
        return self.take(keep)

    def take(self, rows: np.ndarray) -> "Faces":
        return Faces(self.table.iloc[rows].reset_index(drop=True), self.crops[rows], self.landmarks[rows],
                     self.features[rows])


def load_faces(faces_dir: str | Path) -> Faces:
    faces_dir = Path(faces_dir)
    index = read_table(faces_dir / "index.csv")
    index = index[index["status"] == OK].reset_index(drop=True)
    if not len(index):
        raise DataError(f"no usable faces in {faces_dir}: run the faces stage first")
    arrays = FaceArrays(faces_dir)
    stacked = {kind: np.stack(arrays.gather(kind, index["shard"], index["row"]))
               for kind in ("crops", "landmarks", "features")}
    return Faces(index[["clip_id", "identity", "split"]].copy(), stacked["crops"],
                 stacked["landmarks"].astype(np.float32), stacked["features"].astype(np.float32))


def mean_landmarks(faces: Faces) -> np.ndarray:
    """(68, 2) mean landmark positions as fractions of the crop side (pixel centres at
    integer coordinates, so a fraction f is pixel f * (S - 1))."""
    return (faces.landmarks.mean(axis=0) / (faces.crop_size - 1)).astype(np.float32)


def crops_to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0


def target_textures(faces: Faces, mean: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """(n, 3, S, S) float32: each crop warped so its landmarks sit on the mean landmarks."""
    scale = faces.crop_size - 1
    destination = torch.from_numpy(mean * scale)
    out = []
    with torch.no_grad():
        for start in range(0, len(faces), batch_size):
            stop = min(start + batch_size, len(faces))
            images = crops_to_tensor(faces.crops[start:stop])
            source = torch.from_numpy(faces.landmarks[start:stop])
            warped, _ = sparse_image_warp(images, source, destination.expand_as(source))
            out.append(warped)
    return torch.cat(out) if out else torch.zeros((0, 3, faces.crop_size, faces.crop_size))
