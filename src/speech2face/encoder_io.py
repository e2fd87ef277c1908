"""Saving and loading a trained voice encoder: a state dict plus a small JSON of its shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .fsutil import atomic_path
from .models import VoiceEncoder


def save_encoder(model: VoiceEncoder, path: Path, width: float, spectrogram: dict | None = None) -> None:
    """``spectrogram``: the settings of the spectrograms it was trained on (``predict`` computes
    its input with them)."""
    meta = {"out_dim": model.out_dim, "width": width, "n_freq": model.n_freq, "input_mode": model.input_mode,
            "spectrogram": spectrogram}
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def encoder_meta(path: str | Path) -> dict:
    meta_path = Path(path).with_suffix(".json")
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> VoiceEncoder:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"voice encoder {path} (and {meta_path.name}) not found: "
                                f"train it with `dvc repro train_encoder`")
    meta = json.loads(meta_path.read_text())
    model = VoiceEncoder(out_dim=meta["out_dim"], width=meta["width"], n_freq=meta["n_freq"],
                         input_mode=meta.get("input_mode", "complex"))
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.to(device).eval()
