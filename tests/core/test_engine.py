"""The data stages on a real Dask cluster (a LocalCluster started here) give the same outputs
as the local engine, resume shard by shard, and fail in one line on a bad address.

Inputs: the first 8 clips of the sample corpus, cut from data/sample/videos by the download
stage (file:// URLs), in shards of 3 clips (3 shards).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speech2face.core import engine
from speech2face.data.download import run_download
from speech2face.core.params import ParamsError, build_config
from speech2face.data.extract import ExtractConfig, run_extract
from speech2face.data.faces import FacesConfig, run_faces
from speech2face.data.spectrogram import SpectrogramConfig, run_spectrogram

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
pytestmark = pytest.mark.skipif(not (SAMPLE / "videos").is_dir(), reason="sample corpus absent")

EXTRACT = dict(frames_per_clip=1, sample_rate=16000, frame_max_side=480, shard_size=3, workers=2)
SPECTROGRAM = dict(seconds=6.0, sample_rate=16000, window=400, hop=160, n_fft=512, power=0.3, dtype="float16",
                   batch_size=2, workers=2)
FACES = dict(workers=2)
UNREACHABLE = "tcp://127.0.0.1:9"   # discard port: nothing listens there


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, as `dask scheduler` + `dask worker` would give."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("download")
    manifest = folder / "download.csv"
    table = run_download(SAMPLE / "avspeech_sample.csv", folder / "clips", manifest,
                         "file://{root}/data/sample/videos/{id}.mp4", ROOT, allow_file_urls=True, limit=8,
                         workers=2, retries=0, backoff_seconds=0.1, timeout_seconds=30, min_seconds=1.0)
    assert (table["status"] == "ok").sum() == 8
    return manifest, folder / "clips"


def _run_all(base: Path, clips: tuple[Path, Path], **engine_params) -> dict[str, Path]:
    manifest, clips_dir = clips
    out = {"extract": base / "extracted", "spectrogram": base / "spectrograms", "faces": base / "faces"}
    run_extract(manifest, clips_dir, out["extract"], ExtractConfig(**EXTRACT, **engine_params))
    run_spectrogram(out["extract"], out["spectrogram"], SpectrogramConfig(**SPECTROGRAM, **engine_params))
    run_faces(out["extract"], out["faces"], FacesConfig(**FACES, **engine_params))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clips, cluster) -> tuple[dict[str, Path], dict[str, Path]]:
    base = tmp_path_factory.mktemp("runs")
    local = _run_all(base / "local", clips)
    remote = _run_all(base / "dask", clips, engine="dask", cluster_address=cluster.scheduler_address)
    return local, remote


def _assert_same_folder(a: Path, b: Path) -> None:
    """Same files; tables, .npy arrays and json byte for byte; npz archives array by array
    (np.savez stamps each member with the time it was written)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")]
    for name in names:
        if name.endswith(".npz"):
            with np.load(a / name, allow_pickle=False) as x, np.load(b / name, allow_pickle=False) as y:
                assert sorted(x.files) == sorted(y.files)
                for key in x.files:
                    assert x[key].dtype == y[key].dtype, (name, key)
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}:{key}")
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("stage", ["extract", "spectrogram", "faces"])
def test_dask_outputs_equal_local(runs, stage: str) -> None:
    local, remote = runs
    _assert_same_folder(local[stage], remote[stage])
    shard_tables = sorted(p.name for p in remote[stage].glob("shard-*.csv"))
    assert shard_tables == ["shard-00000.csv", "shard-00001.csv", "shard-00002.csv"]


def test_outputs_are_real(runs, cluster) -> None:
    """Guards the equality test against two runs that agree on nothing (empty shards), or
    a dask run that quietly ran here: the cluster ran one task per shard and stage."""
    _, remote = runs
    finished = {name: prefix.state_counts["memory"] for name, prefix in cluster.scheduler.task_prefixes.items()}
    # one task per shard and stage, each a package function (workers import it by reference)
    assert (finished.get("write_extract_shard"), finished.get("compute_shard"), finished.get("faces_shard")) == (3, 3, 3)
    index = (remote["faces"] / "index.csv").read_text()
    assert index.count(",ok,") == 8   # every sample clip shows its speaker's face
    spectra = np.load(remote["spectrogram"] / "shard-00001.npy")
    assert spectra.shape == (3, 598, 257, 2) and np.abs(spectra).max() > 0.1
    assert np.load(remote["faces"] / "features-00002.npy").shape == (2, 128)
    assert json.loads((remote["faces"] / "meta.json").read_text())["dim"] == 128


def _files_of(folder: Path, shard: str) -> list[Path]:
    number = shard.removeprefix("shard-")
    return sorted(p for p in folder.iterdir() if p.stem in (shard, f"features-{number}", f"crops-{number}",
                                                             f"landmarks-{number}"))


@pytest.mark.parametrize("stage", ["extract", "spectrogram", "faces"])
def test_dask_rerun_redoes_only_the_missing_shard(runs, clips, cluster, stage: str, capsys) -> None:
    local, remote = runs
    folder = remote[stage]
    for path in _files_of(folder, "shard-00001"):
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for shard in ("shard-00000", "shard-00002") for p in _files_of(folder, shard)}
    assert len(kept) >= 4
    capsys.readouterr()
    params = dict(engine="dask", cluster_address=cluster.scheduler_address)
    if stage == "extract":
        run_extract(clips[0], clips[1], folder, ExtractConfig(**EXTRACT, **params))
    elif stage == "spectrogram":
        run_spectrogram(remote["extract"], folder, SpectrogramConfig(**SPECTROGRAM, **params))
    else:
        run_faces(remote["extract"], folder, FacesConfig(**FACES, **params))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept           # untouched
    assert _files_of(folder, "shard-00001")                          # redone
    assert "3 done, 5 reused from an earlier run" in capsys.readouterr().out
    _assert_same_folder(local[stage], folder)


def test_dask_without_address_starts_a_local_cluster(runs, clips, tmp_path) -> None:
    local, _ = runs
    out = tmp_path / "extracted"
    run_extract(clips[0], clips[1], out, ExtractConfig(**{**EXTRACT, "workers": 2}, engine="dask", cluster_address=None))
    _assert_same_folder(local["extract"], out)


def test_stage_script_on_the_cluster(runs, cluster, tmp_path) -> None:
    """As DVC runs it (`python stages/spectrogram.py`, paths from dvc.yaml, settings from
    params.yaml): the same bytes as the library call."""
    local, _ = runs
    project = tmp_path / "project"
    shutil.copytree(local["extract"], project / "data" / "extracted")
    params = (ROOT / "params.yaml").read_text()
    section = params[params.index("\nspectrogram:"):]
    section = section[:section.index("\nfaces:")]
    changed = section.replace("engine: local", "engine: dask").replace("cluster_address: null",
                                                                        f"cluster_address: {cluster.scheduler_address}")
    for key, value in SPECTROGRAM.items():   # the test's profile
        changed = re.sub(rf"\n  {key}: [^ \n]+", f"\n  {key}: {value}", changed)
    (project / "params.yaml").write_text(params.replace(section, changed))
    shutil.copy(ROOT / "dvc.yaml", project)
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "spectrogram.py")], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("spectrogram: 8 done, 0 skipped")
    for name in ("index.csv", "shard-00000.csv", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"):
        assert (project / "data" / "spectrograms" / name).read_bytes() == (local["spectrogram"] / name).read_bytes()


def test_unreachable_scheduler_is_one_line(clips, tmp_path) -> None:
    """The stage script with a scheduler address nothing listens on: one line, nothing computed."""
    manifest, clips_dir = clips
    project = tmp_path / "project"
    shutil.copytree(clips_dir, project / "data" / "clips")
    (project / "data" / "manifests").mkdir()
    shutil.copy(manifest, project / "data" / "manifests" / "download.csv")
    params = (ROOT / "params.yaml").read_text()
    section = params[params.index("\nextract:"):]
    section = section[:section.index("\nspectrogram:")]
    changed = section.replace("engine: local", "engine: dask").replace("cluster_address: null",
                                                                        f"cluster_address: {UNREACHABLE}")
    assert changed != section
    (project / "params.yaml").write_text(params.replace(section, changed))
    shutil.copy(ROOT / "dvc.yaml", project)
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "extract.py")], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"extract: cannot reach the dask scheduler at {UNREACHABLE} within "
                                f"{engine.CONNECT_TIMEOUT_SECONDS} s (")
    assert lines[-1].endswith("or set cluster_address: null for a cluster on this machine")
    assert not list((project / "data" / "extracted").glob("shard-*"))


def test_bad_engine_params(tmp_path) -> None:
    cases = [({"engine": "spark"}, "spectrogram.engine = 'spark': expected one of ['local', 'dask']"),
             ({"engine": "dask", "cluster_address": "localhost"}, "spectrogram.cluster_address = 'localhost'"),
             ({"engine": "dask", "cluster_address": 8786}, "spectrogram.cluster_address = 8786")]
    for params, message in cases:
        with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_config(SpectrogramConfig, params)
    defaults = build_config(FacesConfig, {})
    assert (defaults.engine, defaults.cluster_address) == ("local", None)
    remote = build_config(FacesConfig, {"engine": "dask", "cluster_address": "tcp://10.0.0.5:8786"})
    assert (remote.engine, remote.cluster_address) == ("dask", "tcp://10.0.0.5:8786")
    with pytest.raises(ParamsError, match=r"faces\.engine = 'Dask'"):
        build_config(FacesConfig, {"engine": "Dask"})
