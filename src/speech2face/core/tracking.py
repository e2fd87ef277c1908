"""MLflow set-up shared by the training and evaluation stages.

The store is SQLite at ``<project>/mlflow.db`` given by an absolute URI. ``dvc exp run
--temp`` and ``--queue`` run stages in a copy under ``<project>/.dvc/tmp/exps/...``: the
project root is then the folder that holds that ``.dvc``, so every run lands in one store.
``MLFLOW_TRACKING_URI`` in the environment wins over all of this.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

EXPERIMENT = "speech2face"


def project_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(start: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root(start) / 'mlflow.db'}"


def git_revision(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tell one pipeline run from another in the MLflow UI."""
    experiment = os.environ.get("DVC_EXP_NAME", "")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return {
        "stage": stage,
        "git_revision": baseline or git_revision(),
        "dvc_experiment": experiment or "workspace",
        "pipeline_run": os.environ.get("S2F_PIPELINE_RUN", ""),
    }


def start_run(stage: str, params: dict, run_name: str | None = None):
    """An active MLflow run (context manager) with params and tags logged."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # Artifacts beside the store, by absolute path: the default (./mlruns under the
        # working directory) would be lost when a stage runs in a temporary copy.
        mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root() / "mlartifacts").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    tags = run_tags(stage)
    name = run_name or f"{stage}:{tags['dvc_experiment']}"
    run = mlflow.start_run(run_name=name, tags=tags)
    mlflow.log_params(flatten(params, prefix=f"{stage}."))
    return run


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
