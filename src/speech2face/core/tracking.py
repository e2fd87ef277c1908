"""MLflow set-up shared by the training and evaluation stages.

The store is SQLite at ``<project>/mlflow.db`` given by an absolute URI. ``dvc exp run
--temp`` and ``--queue`` run stages in a copy under ``<project>/.dvc/tmp/exps/...``: the
project root is then the folder that holds that ``.dvc``, so every run lands in one store.
``MLFLOW_TRACKING_URI`` in the environment wins over all of this.

Runs: one *pipeline run* per pipeline execution (a ``dvc repro`` or a ``dvc exp run``), named
after the DVC experiment, holding every param of params.yaml (``encoder.lr``) and the headline
figures; each stage's run is nested under it and holds the same params plus its own figures,
curves and files. So the MLflow UI's table and compare view see settings and R@K together.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path

EXPERIMENT = "speech2face"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PIPELINE_KEY_TAG = "pipeline_key"


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


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets DVC_EXP_NAME), else "workspace"."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def pipeline_params(root: Path | None = None) -> dict[str, str]:
    """Every param of the pipeline, flattened as ``section.key`` (``encoder.lr``): what each
    stage's run and the pipeline run carry, so any run can be compared on any setting."""
    import yaml

    path = (root or Path.cwd()) / "params.yaml"
    if not path.is_file():
        return {}
    return flatten(yaml.safe_load(path.read_text()) or {})


def pipeline_key(revision: str, experiment: str, params: dict[str, str]) -> str:
    """One pipeline execution's identity: the code revision, the DVC experiment and the
    params. Every stage of one ``dvc repro`` / ``dvc exp run`` computes the same key, so
    their runs find the same parent run (a rerun of the same settings joins it again)."""
    text = "\n".join([revision, experiment] + [f"{k}={v}" for k, v in sorted(params.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tell one pipeline run from another in the MLflow UI."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return {"stage": stage, "git_revision": baseline or git_revision(), "dvc_experiment": dvc_experiment()}


def use_experiment():
    """The project's MLflow experiment, made on first use; returns its id. Tagged as a model
    development experiment, so the MLflow UI opens it on the runs table (MLflow 3 otherwise
    may open the GenAI overview)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # Artifacts beside the store, by absolute path: the default (./mlruns under the
        # working directory) would be lost when a stage runs in a temporary copy.
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root() / "mlartifacts").as_uri(),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def pipeline_run_id(experiment_id: str, tags: dict[str, str], params: dict[str, str]) -> str:
    """The parent run of this pipeline execution: found by its key, or made (named after the
    DVC experiment, with every param) when this is its first stage."""
    import mlflow
    from mlflow.entities import Param, RunStatus, RunTag

    client = mlflow.MlflowClient()
    key = pipeline_key(tags["git_revision"], tags["dvc_experiment"], params)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'",
                               order_by=["start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=tags["dvc_experiment"], tags={
        PIPELINE_KEY_TAG: key, "stage": "pipeline", "git_revision": tags["git_revision"],
        "dvc_experiment": tags["dvc_experiment"]})
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):   # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100], tags=[RunTag("mlflow.note.content",
                         "One pipeline execution; the stages are its nested runs.")] if i == 0 else [])
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run.info.run_id


@contextlib.contextmanager
def start_run(stage: str):
    """An active MLflow run of ``stage``, nested under its pipeline run, with every param of
    the pipeline (``section.key``) logged. Yields the parent run's id."""
    import mlflow

    experiment_id = use_experiment()
    tags = run_tags(stage)
    params = pipeline_params()
    parent = pipeline_run_id(experiment_id, tags, params)
    with mlflow.start_run(run_name=f"{stage}:{tags['dvc_experiment']}",
                          tags={**tags, "mlflow.parentRunId": parent}):
        mlflow.log_params(params)
        yield parent


def log_to_pipeline_run(parent: str, metrics: dict[str, float]) -> None:
    """The headline figures on the pipeline run too: its row in the runs table and the compare
    view then hold every param and R@K together."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


@contextlib.contextmanager
def quiet_artifacts():
    """No per-file progress bars while MLflow copies artifacts (they would fill the stage's log)."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
