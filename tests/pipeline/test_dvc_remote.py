"""A DVC remote shares finished stage outputs between machines: machine A runs the first
stages and `dvc push`es to a remote (a local folder standing in for S3); machine B, a fresh
clone of A's git repository (dvc.lock and the remote's config, no cache, no outputs), runs
`dvc repro --pull` and gets A's outputs without running a stage command.

Which stage commands ran is observed, not inferred from DVC's wording: the stages run
`python stages/<name>.py` through the shell's PATH, so a `python` shim first on PATH logs each
call and execs the real interpreter. The stages are deterministic (a recompute gives the same
bytes, checked in the last test), so byte-identical outputs alone would not prove a pull.
Only download -> extract -> spectrogram run (~40 s on 2 cores); the later stages add minutes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline_copy import VENV_BIN, env, make_project_copy, run

pytestmark = pytest.mark.slow

TARGET = "spectrogram"
STAGES = ("download", "extract", "spectrogram")
OUTPUTS = ("data/clips", "data/manifests/download.csv", "data/extracted", "data/spectrograms")


def _shim(folder: Path) -> Path:
    folder.mkdir()
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "$STAGE_COMMAND_LOG"\nexec "{VENV_BIN / "python"}" "$@"\n')
    shim.chmod(0o755)
    return folder


def _dvc(args: list[str], cwd: Path, shim: Path, log: Path) -> tuple[str, list[str]]:
    """Run `dvc ...`; returns its output and the stage commands that ran meanwhile."""
    log.unlink(missing_ok=True)
    environment = env()
    environment["PATH"] = f"{shim}:{environment['PATH']}"  # `dvc` itself still resolves to the venv's
    environment["STAGE_COMMAND_LOG"] = str(log)
    result = subprocess.run(["dvc", *args], cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed ({result.returncode}):\n{output[-3000:]}"
    return output, log.read_text().splitlines() if log.exists() else []


def _digests(root: Path) -> dict[str, str]:
    files = {}
    for rel in OUTPUTS:
        path = root / rel
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file():
                files[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


def _status(cwd: Path) -> dict:
    """`dvc status` of the target and its upstream stages (the later ones never ran)."""
    return json.loads(run(["dvc", "status", "--json", TARGET], cwd).stdout or "{}")


@pytest.fixture(scope="module")
def machines(tmp_path_factory) -> dict:
    """Machine A after `dvc repro spectrogram` + `dvc push` + a git commit; B a fresh clone of
    A after `dvc repro --pull spectrogram` (its output and stage commands kept for the tests)."""
    tmp = tmp_path_factory.mktemp("dvc_remote")
    shim, log = _shim(tmp / "shim"), tmp / "stage_commands.log"
    remote = tmp / "remote"
    remote.mkdir()
    (tmp / "a").mkdir()
    a = make_project_copy(tmp / "a")
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], a)
    a_output, a_ran = _dvc(["repro", TARGET], a, shim, log)
    run(["dvc", "push"], a)
    run(["git", "add", "-A"], a)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run + remote"], a)
    b = tmp / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp)
    b_before = {"cache": (b / ".dvc" / "cache").exists(), "outputs": [r for r in OUTPUTS if (b / r).exists()]}
    b_output, b_ran = _dvc(["repro", "--pull", TARGET], b, shim, log)
    return dict(a=a, b=b, remote=remote, shim=shim, log=log, a_output=a_output, a_ran=a_ran,
                b_before=b_before, b_output=b_output, b_ran=b_ran)


def test_machine_a_runs_the_stages_and_pushes_them(machines: dict) -> None:
    # the shim sees the commands when they do run (else its silence on B would prove nothing)
    assert machines["a_ran"] == [f"stages/{stage}.py" for stage in STAGES]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in machines["a_output"]
    assert any((machines["remote"] / "files" / "md5").rglob("*.dir"))  # directory outputs reached the remote
    assert _status(machines["a"]) == {}


def test_repro_pull_on_a_fresh_clone_restores_outputs_without_running_stages(machines: dict) -> None:
    a, b, output = machines["a"], machines["b"], machines["b_output"]
    assert machines["b_before"] == {"cache": False, "outputs": []}  # B started with nothing to reuse
    assert machines["b_ran"] == [], f"stage commands ran on B: {machines['b_ran']}"
    for stage in STAGES:
        assert f"Pulling data for stage: '{stage}'" in output
        assert f"Running stage '{stage}'" not in output and f"{stage}: 30 done" not in output
    a_files = _digests(a)
    assert len(a_files) > 30 and _digests(b) == a_files
    # the outputs name neither machine's folder (the manifest keeps the URL template's {root})
    manifest = (b / "data/manifests/download.csv").read_text()
    assert "file://{root}/data/sample/videos/" in manifest and str(a) not in manifest and str(b) not in manifest
    assert _status(b) == {}


def test_a_changed_param_reruns_only_its_stage(machines: dict) -> None:
    b = machines["b"]
    params = yaml.safe_load((b / "params.yaml").read_text())
    params["spectrogram"]["power"] = 0.5
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output, ran = _dvc(["repro", "--pull", TARGET], b, machines["shim"], machines["log"])
    assert ran == ["stages/spectrogram.py"], output
    assert "Running stage 'spectrogram'" in output
    a_files, b_files = _digests(machines["a"]), _digests(b)
    upstream = {k: v for k, v in a_files.items() if not k.startswith("data/spectrograms/")}
    assert {k: b_files[k] for k in upstream} == upstream
    changed = [k for k in a_files if k.startswith("data/spectrograms/") and k.endswith(".npy")]
    assert changed and all(b_files[k] != a_files[k] for k in changed)
    assert _status(b) == {}


def test_without_cache_or_remote_the_stage_is_recomputed(machines: dict, tmp_path: Path) -> None:
    """The same `repro --pull` with nothing to pull from runs the command: the skip in the
    second test came from the remote. `-s`: download and extract, whose cache is deleted too,
    would otherwise rerun as well (half a minute)."""
    b = machines["b"]
    run(["git", "checkout", "--", "params.yaml", "dvc.lock"], b)
    empty = tmp_path / "empty_remote"
    empty.mkdir()
    run(["dvc", "remote", "modify", "--local", "storage", "url", str(empty)], b)
    shutil.rmtree(b / ".dvc" / "cache")
    shutil.rmtree(b / "data" / "spectrograms")
    try:
        output, ran = _dvc(["repro", "--pull", "-s", TARGET], b, machines["shim"], machines["log"])
    finally:
        (b / ".dvc" / "config.local").unlink()  # back to the committed remote
    assert "Unable to pull data for stage: 'spectrogram'" in output
    assert ran == ["stages/spectrogram.py"] and "spectrogram: 30 done" in output
    assert _digests(b) == _digests(machines["a"])  # deterministic: a pull is told apart by the log only
    assert _status(b) == {}
