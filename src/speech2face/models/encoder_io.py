"""Saving and loading a trained voice encoder: a state dict plus a small JSON of its shape
(speech2face.core.model_files)."""

from __future__ import annotations

from pathlib import Path

import torch

from speech2face.core.model_files import load_model, read_meta, save_model
from speech2face.models.voice_encoder import VoiceEncoder


# Bounds of the sizes a model JSON may ask for (the paper's encoder: 4096-D out, width 1,
# 257 frequencies): a hostile file cannot make the loader allocate gigabytes.
SIZE_LIMITS = {"out_dim": (1, 8192), "width": (1e-3, 2.0), "n_freq": (2, 2049)}


def save_encoder(model: VoiceEncoder, path: Path, width: float, spectrogram: dict | None = None) -> None:
    """``spectrogram``: the settings of the spectrograms it was trained on (``predict`` computes
    its input with them)."""
    save_model(model, path, {"out_dim": model.out_dim, "width": width, "n_freq": model.n_freq,
                             "input_mode": model.input_mode, "spectrogram": spectrogram})


def encoder_meta(path: str | Path) -> dict:
    return read_meta(path)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> VoiceEncoder:
    """``ModelFileError`` (one line; ``ModelFileMissing``, a FileNotFoundError, when absent)."""
    return load_model(path, lambda meta: VoiceEncoder(out_dim=meta["out_dim"], width=meta["width"],
                                                      n_freq=meta["n_freq"],
                                                      input_mode=meta.get("input_mode", "complex")),
                      "voice encoder", "train_encoder", device, limits=SIZE_LIMITS)
