"""The real pipeline end to end on a tiny slice of the sample, in a temp copy:
`dvc repro`, MLflow (client and the real UI in headless Chromium), `dvc exp run`/`show`,
and DVC's change detection. Tests in this module run in file order on one copy."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_copy import VENV_BIN, env, make_project_copy, run
from speech2face.tables import read_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = make_project_copy(tmp_path_factory.mktemp("project"))
    result = run(["dvc", "repro"], dest)
    (dest / "repro.log").write_text(result.stdout + result.stderr)
    return dest


def test_data_stages_produce_aligned_outputs(project: Path) -> None:
    download = read_table(project / "data/manifests/download.csv")
    assert len(download) == 30 and (download["status"] == "ok").all()
    spectra = read_table(project / "data/spectrograms/index.csv")
    faces = read_table(project / "data/faces/index.csv")
    assert set(spectra["clip_id"]) == set(download["clip_id"])
    assert (faces["status"] == "ok").sum() >= 28  # every sample clip has a detectable face
    shard = spectra.iloc[0]["shard"]
    array = np.load(project / f"data/spectrograms/{shard}.npy", mmap_mode="r")
    assert array.shape[1:] == (598, 257, 2) and array.dtype == np.float16
    features = np.load(project / f"data/faces/features-{faces.iloc[0]['shard'].removeprefix('shard-')}.npy")
    assert features.shape[1] == 128
    assert faces.groupby("identity")["split"].nunique().max() == 1  # no identity in two splits
    log = (project / "repro.log").read_text()
    for stage in ("download", "extract", "spectrogram", "faces", "train_encoder", "evaluate"):
        assert f"{stage}:" in log  # each stage printed its summary line


def test_evaluation_reports(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())
    n = metrics["gallery_identities"]
    assert n >= 2 and metrics["test_queries"] >= n
    assert metrics["chance_R@1"] == pytest.approx(1 / n)
    assert 0.0 <= metrics["R@1"] <= 1.0 and metrics["R@" + str(n)] == 1.0
    curve = (project / "reports/recall_at_k.csv").read_text().splitlines()
    assert curve[0] == "k,chance,cnn,ridge"
    for png in ("recall_at_k.png", "retrieval_gallery.png"):
        assert (project / "reports" / png).read_bytes()[:4] == b"\x89PNG"


def _mlflow_runs(project: Path):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("speech2face")
    return client, experiment, client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


def test_mlflow_has_training_and_evaluation_runs(project: Path) -> None:
    client, _, runs = _mlflow_runs(project)
    stages = [r.data.tags.get("stage") for r in runs]
    assert "train_encoder" in stages and "evaluate" in stages
    evaluation = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert evaluation.data.metrics["R_at_1"] == pytest.approx(metrics["R@1"])
    assert len(evaluation.data.tags["git_revision"]) == 40
    training = next(r for r in runs if r.data.tags["stage"] == "train_encoder")
    history = client.get_metric_history(training.info.run_id, "train_loss")
    assert len(history) == 2  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(training.info.run_id, "model")}
    assert artifacts == {"model/voice_encoder.pt", "model/voice_encoder.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_mlflow_ui_shows_r_at_1_in_a_real_browser(project: Path, tmp_path: Path) -> None:
    _, experiment, runs = _mlflow_runs(project)
    evaluation = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    port = _free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs/{evaluation.info.run_id}"
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
             "--virtual-time-budget=30000", "--dump-dom", url],
            capture_output=True, text=True, timeout=180).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    value = evaluation.data.metrics["R_at_1"]
    assert "R_at_1" in dom, "the run page did not render its metrics"
    shown = {f"{value:g}", f"{value:.3g}", f"{value:.4g}", str(round(value, 4))}
    assert any(s in dom for s in shown), f"R@1 = {value} not found on the rendered run page"


def test_dvc_experiments_show_r_at_k_and_reach_mlflow(project: Path) -> None:
    # one in a temp copy (under .dvc/tmp/exps): its MLflow run must still reach the project store
    run(["dvc", "exp", "run", "--temp", "-n", "seed1", "-S", "encoder.seed=1"], project)
    run(["dvc", "exp", "run", "-n", "seed2", "-S", "encoder.seed=2"], project)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs", []):
                name = revision.get("name")
                data = revision.get("data") or {}
                metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data", {})
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                if name in ("seed1", "seed2"):
                    found[name] = (params["encoder"]["seed"], metrics["R@1"])
    assert set(found) == {"seed1", "seed2"} and found["seed1"][0] == 1 and found["seed2"][0] == 2
    _, _, runs = _mlflow_runs(project)
    tagged = {r.data.tags.get("dvc_experiment"): r for r in runs if r.data.tags.get("stage") == "evaluate"}
    for name in ("seed1", "seed2"):
        assert tagged[name].data.metrics["R_at_1"] == pytest.approx(found[name][1])


def test_changing_a_spectrogram_param_reruns_only_what_follows(project: Path) -> None:
    status = json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")
    assert status == {}, f"pipeline not up to date after repro: {status}"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["spectrogram"]["power"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")
    changed = {name.split(":")[-1] for name in status}
    assert "spectrogram" in changed
    assert not changed & {"download", "extract", "faces"}
