"""A trained model on disk: ``NAME.pt`` (a torch state dict) beside ``NAME.json`` (what it
takes to build the module again: sizes, and whatever else its users need to know).

Both are written atomically. Loading reads the JSON, builds the module, then the state dict
with ``weights_only=True``; the files are the user's (``speech2face predict --encoder ...``),
so anything wrong with them is one ``ModelFileError`` line naming the file, never a traceback.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from speech2face.core.errors import Speech2FaceError
from speech2face.core.fsutil import atomic_path, save_torch

Module = TypeVar("Module", bound=nn.Module)


class ModelFileError(Speech2FaceError, ValueError):
    """A model cannot be loaded: unreadable settings or weights, or weights of another shape."""


class ModelFileMissing(ModelFileError, FileNotFoundError):
    """The weights or the settings file is not there (train the model first)."""


def save_model(model: nn.Module, path: Path, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(model.state_dict(), path)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | Path) -> dict:
    """The settings saved beside the weights at ``path`` ({} when there are none)."""
    meta_path = Path(path).with_suffix(".json")
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


MAX_META_BYTES = 1 << 20


def load_model(path: str | Path, build: Callable[[dict], Module], what: str, stage: str,
               device: str | torch.device = "cpu", limits: dict[str, tuple[float, float]] | None = None) -> Module:
    """``build(meta)`` the module, load the weights into it; ``what`` ("face decoder") and
    ``stage`` (the DVC stage that trains it) word the errors. ``limits``: {key: (lowest,
    highest)} of the sizes in the JSON, checked before anything is built, so a hostile JSON
    cannot make the module allocate without bound."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise ModelFileMissing(f"{what} {path} (and {meta_path.name}) not found: train it with `dvc repro {stage}`")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise ModelFileError(f"{what} settings {meta_path} are unusable: larger than {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(meta_path.read_text())
        check_limits(meta, limits or {})
        model = build(meta)
    except (ValueError, KeyError, TypeError) as error:   # JSONDecodeError is a ValueError
        raise ModelFileError(f"{what} settings {meta_path} are unusable: {first_line(error)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise ModelFileError(f"{what} {path} is not a readable state dict: {first_line(error)}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:   # TypeError/AttributeError: not a dict
        raise ModelFileError(f"{what} {path} does not match {meta_path.name}: {first_line(error)}") from None
    return model.to(device).eval()


def check_limits(meta: dict, limits: dict[str, tuple[float, float]]) -> None:
    """ValueError unless every ``limits`` key of ``meta`` is a number within its bounds."""
    if not isinstance(meta, dict):
        raise ValueError("expected a JSON object")
    for key, (lowest, highest) in limits.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lowest <= value <= highest:
            raise ValueError(f"{key} = {value!r}: expected a number from {lowest:g} to {highest:g}")


def first_line(error: BaseException) -> str:
    """The first informative line of an error: torch's load_state_dict opens with a generic
    "Error(s) in loading state_dict for ...:" and lists what mismatched on the next lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return (lines[0] if lines else type(error).__name__)[:300]
