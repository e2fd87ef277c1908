"""Where the pipeline's files are: the ``vars: paths`` block of ``dvc.yaml``, read here.

dvc.yaml is the one place the paths are written: its stages use them as ``${paths.x}`` in
deps and outs, and the stage scripts get the same values from ``project_paths()``, so the
two cannot disagree. Library functions never read this: they take their paths as
arguments (tests and benchmarks run them on temporary folders).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from speech2face.core.errors import Speech2FaceError

PIPELINE_FILE = Path("dvc.yaml")


@dataclass(frozen=True)
class ProjectPaths:
    clips: Path                 # download: one exact segment per CSV row
    download_manifest: Path     # download: every row's status and reason
    extracted: Path             # extract: 16 kHz audio + frames, in shards
    spectrograms: Path          # spectrogram: compressed STFTs, in shards
    speaker_embeddings: Path    # speaker_embeddings: a pretrained GE2E embedding per clip, in shards
    faces: Path                 # faces: crops, landmarks, features, splits
    checkpoints: Path           # training: resume state (machine-local, not an output)
    decoder: Path               # train_decoder: the face decoder (+ .json)
    encoder: Path               # train_encoder: the voice encoder (+ .json)
    voice_head: Path            # train_voice_head: GE2E + head (+ .json)
    reports: Path               # metrics, summaries, plots


def project_paths(pipeline: str | Path = PIPELINE_FILE) -> ProjectPaths:
    """The paths of ``dvc.yaml``'s ``vars: - paths:`` block, relative to the project root."""
    pipeline = Path(pipeline)
    if not pipeline.exists():
        raise Speech2FaceError(f"{pipeline} not found (run stages from the project root)")
    document = yaml.safe_load(pipeline.read_text()) or {}
    block = next((entry["paths"] for entry in document.get("vars", []) if isinstance(entry, dict)
                  and "paths" in entry), None)
    names = [f.name for f in fields(ProjectPaths)]
    if not isinstance(block, dict) or sorted(block) != sorted(names):
        raise Speech2FaceError(f"{pipeline}: vars: - paths: must name exactly {names}")
    return ProjectPaths(**{name: Path(block[name]) for name in names})
