"""A pretrained speaker backbone with a trained head: voice -> face feature.

``VoiceHead`` = GE2E (speech2face.models.ge2e, resemblyzer's trained weights) followed by a
small MLP (256 -> ``hidden`` -> ReLU -> face-feature size; ``hidden`` 0: one linear layer).
A clip's voice is its GE2E utterance embedding: every 1.6 s partial of the clip through the
LSTM, the partials summed per clip and scaled to unit length (the same direction as the
mean resemblyzer takes, so a frozen backbone gives ``GE2EEncoder.embed_utterances`` exactly,
to float rounding). The head maps that to the face feature and is trained with the voice
encoder's loss (speech2face.training.voice_head).

``freeze_backbone``: the GE2E weights stay as pretrained (only the head learns) or are
fine-tuned with the head. The file (``save_voice_head``) holds both parts, so prediction
needs no other weights; its JSON records the front end (resemblyzer's preprocessing on or
off, 16 kHz, 40 mel bands, 160-frame partials at 1.3 per second) that ``speech2face predict``
uses again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speech2face.core.model_files import load_model, read_meta, save_model
from speech2face.models import ge2e

BACKBONES = ("ge2e",)
KIND = "voice_head"   # the "kind" key of the JSON: tells a voice head's file from a Table-1 encoder's

# Bounds of the sizes a model JSON may ask for: a hostile file cannot make the loader allocate gigabytes.
SIZE_LIMITS = {"out_dim": (1, 8192), "hidden": (0, 8192)}


class VoiceHead(nn.Module):
    def __init__(self, out_dim: int, hidden: int = 512, freeze_backbone: bool = True,
                 backbone: ge2e.GE2EEncoder | None = None):
        super().__init__()
        self.out_dim, self.hidden, self.freeze_backbone = out_dim, hidden, freeze_backbone
        self.backbone = backbone if backbone is not None else ge2e.GE2EEncoder()
        if freeze_backbone:
            self.backbone.freeze()
        layers: list[nn.Module] = ([nn.Linear(ge2e.EMBEDDING_SIZE, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
                                   if hidden else [nn.Linear(ge2e.EMBEDDING_SIZE, out_dim)])
        self.head = nn.Sequential(*layers)

    def utterance_embeddings(self, mels: torch.Tensor, owner: torch.Tensor, clips: int) -> torch.Tensor:
        """(partials, 160, 40) mels of ``clips`` clips, ``owner[p]`` the clip of partial p ->
        (clips, 256) unit-length utterance embeddings."""
        partials = self.backbone(mels)
        sums = partials.new_zeros(clips, partials.shape[1]).index_add(0, owner, partials)
        return F.normalize(sums, dim=1)

    def forward(self, mels: torch.Tensor, owner: torch.Tensor, clips: int) -> torch.Tensor:
        """(clips, out_dim) predicted face features."""
        return self.head(self.utterance_embeddings(mels, owner, clips))


@dataclass
class PartialMels:
    """The GE2E input of many clips: all their partials in one array, and whose each one is."""
    mels: np.ndarray      # (partials, 160, 40) float32
    owner: np.ndarray     # (partials,) int64: index of the clip in clip_ids
    clip_ids: list[str]

    def __len__(self) -> int:
        return len(self.clip_ids)

    @classmethod
    def of_wavs(cls, wavs: list[np.ndarray], clip_ids: list[str]) -> "PartialMels":
        mels = [ge2e.partial_mels(wav) for wav in wavs]
        owner = np.concatenate([np.full(len(m), i, dtype=np.int64) for i, m in enumerate(mels)]) if mels else (
            np.zeros(0, np.int64))
        stacked = np.concatenate(mels) if mels else np.zeros((0, ge2e.PARTIAL_FRAMES, ge2e.N_MELS), np.float32)
        return cls(stacked, owner, list(clip_ids))

    def batch(self, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mels, owner renumbered 0..len(clips)-1, len(clips)) of the clips at indices ``clips``."""
        position = np.full(len(self.clip_ids), -1, dtype=np.int64)
        position[clips] = np.arange(len(clips))
        chosen = np.flatnonzero(position[self.owner] >= 0)
        return (torch.from_numpy(self.mels[chosen]), torch.from_numpy(position[self.owner[chosen]]), len(clips))


def utterance_embeddings(model: VoiceHead, inputs: PartialMels, clips_per_batch: int = 64) -> torch.Tensor:
    """(clips, 256) backbone embeddings of every clip of ``inputs``, without gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), clips_per_batch):
            out.append(model.utterance_embeddings(*inputs.batch(np.arange(start, min(start + clips_per_batch,
                                                                                     len(inputs))))))
    return torch.cat(out) if out else torch.zeros(0, ge2e.EMBEDDING_SIZE)


def predict_clips(model: VoiceHead, inputs: PartialMels, clips_per_batch: int = 64) -> np.ndarray:
    """(clips, out_dim) float32 predicted face features of every clip of ``inputs``."""
    model.eval()
    with torch.no_grad():
        return model.head(utterance_embeddings(model, inputs, clips_per_batch)).numpy().astype(np.float32)


def save_voice_head(model: VoiceHead, path: Path, preprocess: bool) -> None:
    save_model(model, path, {"kind": KIND, "backbone": "ge2e", "out_dim": model.out_dim, "hidden": model.hidden,
                             "freeze_backbone": model.freeze_backbone,
                             "front_end": {"preprocess": preprocess, "sample_rate": ge2e.SAMPLE_RATE,
                                           "n_mels": ge2e.N_MELS, "partial_frames": ge2e.PARTIAL_FRAMES,
                                           "partials_per_second": ge2e.PARTIALS_PER_SECOND}})


def is_voice_head(path: str | Path) -> bool:
    """Whether the model file at ``path`` is a voice head (not a Table-1 encoder)."""
    try:
        return read_meta(path).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def front_end_preprocess(path: str | Path) -> bool:
    """Whether the voice head at ``path`` was trained on preprocessed audio (its file's
    ``front_end.preprocess``; true, GE2E's own way, where the file does not say)."""
    front_end = read_meta(path).get("front_end")
    return bool(front_end.get("preprocess", True)) if isinstance(front_end, dict) else True


def load_voice_head(path: str | Path, device: str | torch.device = "cpu") -> VoiceHead:
    """``ModelFileError`` (one line) when the files are missing or unusable."""
    def build(meta: dict) -> VoiceHead:
        if meta.get("kind") != KIND or meta.get("backbone") not in BACKBONES:
            raise ValueError(f"not a voice head of a known backbone (kind {meta.get('kind')!r}, backbone "
                             f"{meta.get('backbone')!r})")
        return VoiceHead(out_dim=int(meta["out_dim"]), hidden=int(meta["hidden"]),
                         freeze_backbone=bool(meta.get("freeze_backbone", True)))
    return load_model(path, build, "voice head", "train_voice_head", device, limits=SIZE_LIMITS)
