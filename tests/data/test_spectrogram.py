"""Spectrogram stage on extract shards built on the fly: real speech, noise, empty and silent clips."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speech2face.data import extract_files as extracted
from speech2face.core import shards
from speech2face.data.audio import SpectrogramSettings, spectrogram
from speech2face.core.params import ParamsError, build_config
from speech2face.data.spectrogram import SpectrogramConfig, run_spectrogram
from speech2face.data.spectrogram_files import open_spectrograms
from speech2face.core.tables import read_table

ROOT = Path(__file__).resolve().parents[2]
LIBRISPEECH = ROOT.parent / "shared" / "media" / "speech" / "librispeech"
pytestmark = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"real media folder {LIBRISPEECH} absent")


SR = 16000
PARAMS = dict(seconds=6.0, sample_rate=SR, window=400, hop=160, n_fft=512, power=0.3, dtype="float16",
              batch_size=2, workers=2)
SETTINGS = SpectrogramSettings(6.0, SR, 400, 160, 512, 0.3)


def _config(**changes) -> SpectrogramConfig:
    """The spectrogram section as the stage builds it (checked), with ``changes``."""
    return build_config(SpectrogramConfig, {**PARAMS, **changes})


def _speech(name: str, seconds: float | None = None) -> np.ndarray:
    import soundfile

    audio, rate = soundfile.read(LIBRISPEECH / name.split("-")[0] / f"{name}.flac", dtype="int16")
    assert rate == SR
    return audio if seconds is None else audio[:int(seconds * SR)]


def _noise(seconds: float, seed: int) -> np.ndarray:
    return (3000 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).clip(-32768, 32767).astype(np.int16)


def _write_extract_shard(folder: Path, name: str, clips: dict[str, np.ndarray], failed: dict[str, str],
                         sample_rate: int = SR) -> None:
    """An extract stage shard: npz of the clips that succeeded + the table of all clips."""
    tiny_frame = extracted.encode_jpeg(np.full((8, 8, 3), 128, np.uint8))
    ids = list(clips)
    extracted.save_shard(folder / f"{name}.npz", ids, [clips[i] for i in ids], [[tiny_frame] for _ in ids],
                         sample_rate)
    table = pd.DataFrame({
        "clip_id": ids + list(failed),
        "youtube_id": ids + list(failed),
        "x": 0.5, "y": 0.5,
        "status": ["ok"] * len(ids) + ["failed"] * len(failed),
        "reason": [""] * len(ids) + list(failed.values()),
        "audio_seconds": [round(len(clips[i]) / sample_rate, 4) for i in ids] + [0.0] * len(failed),
    })
    shards.write_shard_table(folder, name, table)


@pytest.fixture()
def extract_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "extracted"
    folder.mkdir()
    _write_extract_shard(folder, "shard-00000", {
        "speech3s": _speech("1688-142285-0000", seconds=3.0),  # real speech, looped twice
        "noise7s": _noise(7.0, seed=0),                       # cut to 6 s
        "empty": np.zeros(0, np.int16),
        "noise1s": _noise(1.0, seed=1),
    }, failed={"broken": "no_audio"})
    _write_extract_shard(folder, "shard-00001", {
        "silent": np.zeros(2 * SR, np.int16),
        "speech": _speech("2609-156975-0000"),
    }, failed={})
    return folder


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*"))}


def test_stage_writes_memory_mappable_shards_equal_to_the_library(extract_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "spectrograms"
    index = run_spectrogram(extract_dir, out, _config())

    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("spectrogram: 4 done, 3 skipped (empty_audio: 1, extract_failed: 1, silent_audio: 1)")
    assert list(index.columns) == ["clip_id", "row", "status", "reason", "source_seconds", "shard"]
    rows = {r.clip_id: (r.shard, r.row, r.status, r.reason, r.source_seconds) for r in index.itertuples()}
    assert rows["speech3s"] == ("shard-00000", 0, "ok", "", 3.0)
    assert rows["noise7s"] == ("shard-00000", 1, "ok", "", 7.0)
    assert rows["empty"] == ("shard-00000", -1, "skipped", "empty_audio", 0.0)
    assert rows["noise1s"] == ("shard-00000", 2, "ok", "", 1.0)
    assert rows["silent"] == ("shard-00001", -1, "skipped", "silent_audio", 2.0)
    assert rows["speech"][:4] == ("shard-00001", 0, "ok", "")
    assert "broken" not in rows  # failed upstream: counted in the summary, not listed
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "index.csv", "shard-00000.csv", "shard-00000.npy", "shard-00001.csv", "shard-00001.npy"]

    loaded_index, arrays = open_spectrograms(out)
    pd.testing.assert_frame_equal(loaded_index, read_table(out / "index.csv"))
    assert set(arrays) == {"shard-00000", "shard-00001"}
    assert isinstance(arrays["shard-00000"], np.memmap)
    assert arrays["shard-00000"].shape == (3, 598, 257, 2) and arrays["shard-00000"].dtype == np.float16
    assert arrays["shard-00001"].shape == (1, 598, 257, 2)

    for name, array in arrays.items():
        source = extracted.load_shard(extract_dir / f"{name}.npz")
        for row in loaded_index[(loaded_index["shard"] == name) & (loaded_index["status"] == "ok")].itertuples():
            expected = spectrogram(source.audio_float(source.clip_ids.index(row.clip_id)), SETTINGS)
            stored = np.asarray(array[row.row], dtype=np.float32)
            # float16 keeps 11 significant bits: relative error <= 2^-11
            np.testing.assert_allclose(stored, expected, rtol=2 ** -10, atol=1e-6)
            assert np.abs(stored).max() > 1.0  # real content, not zeros


def test_float32_output_equals_library_exactly(extract_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "spectrograms32"
    run_spectrogram(extract_dir, out, _config(dtype="float32", batch_size=3))
    _, arrays = open_spectrograms(out)
    source = extracted.load_shard(extract_dir / "shard-00000.npz")
    assert arrays["shard-00000"].dtype == np.float32
    np.testing.assert_allclose(arrays["shard-00000"][1], spectrogram(source.audio_float(1), SETTINGS),
                               rtol=1e-6, atol=1e-6)


def test_rerun_reuses_finished_shards_and_redoes_the_rest(extract_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "spectrograms"
    first_index = run_spectrogram(extract_dir, out, _config())
    first = _mtimes(out)

    second_index = run_spectrogram(extract_dir, out, _config())
    assert _mtimes(out) == first  # nothing rewritten
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("spectrogram: 0 done, 6 reused")
    pd.testing.assert_frame_equal(second_index.reset_index(drop=True), read_table(out / "index.csv"))
    assert list(second_index["clip_id"]) == list(first_index["clip_id"])

    # a lost array: only its shard is redone
    (out / "shard-00001.npy").unlink()
    run_spectrogram(extract_dir, out, _config())
    now = _mtimes(out)
    assert now["shard-00000.npy"] == first["shard-00000.npy"] and now["shard-00000.csv"] == first["shard-00000.csv"]
    assert (out / "shard-00001.npy").exists() and now["shard-00001.csv"] != first["shard-00001.csv"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("spectrogram: 1 done, 4 reused")

    # other settings: nothing from before can be trusted
    before = np.array(open_spectrograms(out)[1]["shard-00000"][0], dtype=np.float32)
    run_spectrogram(extract_dir, out, _config(power=0.5))
    assert all(_mtimes(out)[name] != now[name] for name in now)
    after = np.array(open_spectrograms(out)[1]["shard-00000"][0], dtype=np.float32)
    assert not np.allclose(before, after)

    # an extract shard that disappeared takes its outputs with it
    for suffix in (".npz", ".csv"):
        (extract_dir / f"shard-00001{suffix}").unlink()
    index = run_spectrogram(extract_dir, out, _config(power=0.5))
    assert set(index["shard"]) == {"shard-00000"} and not (out / "shard-00001.npy").exists()


def test_missing_or_unreadable_extract_array_is_reported_and_retried_later(extract_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "spectrograms"
    moved = tmp_path / "held-back.npz"
    (extract_dir / "shard-00001.npz").rename(moved)
    index = run_spectrogram(extract_dir, out, _config())
    shard1 = index[index["shard"] == "shard-00001"]
    assert list(shard1["reason"]) == ["missing_extract_shard", "missing_extract_shard"]
    assert not (out / "shard-00001.csv").exists()  # not marked finished
    assert "missing_extract_shard: 2" in capsys.readouterr().out
    assert set(open_spectrograms(out)[1]) == {"shard-00000"}  # the loader copes

    (extract_dir / "shard-00001.npz").write_bytes(moved.read_bytes()[:1000])  # truncated copy
    index = run_spectrogram(extract_dir, out, _config())
    assert set(index.loc[index["shard"] == "shard-00001", "reason"]) == {"unreadable_extract_shard"}
    assert not (out / "shard-00001.csv").exists()

    moved.replace(extract_dir / "shard-00001.npz")
    index = run_spectrogram(extract_dir, out, _config())
    assert list(index.loc[index["shard"] == "shard-00001", "status"]) == ["skipped", "ok"]
    assert "4 reused" in capsys.readouterr().out.strip().splitlines()[-1]  # shard 0 kept throughout


def test_bad_params_stop_the_stage_with_one_line(extract_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "spectrograms"
    with pytest.raises(ParamsError, match="dtype"):
        run_spectrogram(extract_dir, out, _config(dtype="int8"))
    with pytest.raises(ParamsError, match="n_fft"):
        run_spectrogram(extract_dir, out, _config(n_fft=256))
    with pytest.raises(ParamsError, match="batch_size"):
        run_spectrogram(extract_dir, out, _config(batch_size=0))
    assert not out.exists()  # checked before any work
    with pytest.raises(ParamsError, match="8000 Hz"):
        wrong_rate = tmp_path / "extracted8k"
        wrong_rate.mkdir()
        _write_extract_shard(wrong_rate, "shard-00000", {"a": _noise(1.0, seed=2)}, {}, sample_rate=8000)
        run_spectrogram(wrong_rate, out, _config())


def test_main_reads_params_from_the_project_root(extract_dir: Path, tmp_path: Path) -> None:
    """`python stages/spectrogram.py` as DVC runs it: params.yaml and data/ in the working dir."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    extract_dir.rename(project / "data" / "extracted")
    section = "\n".join(f"  {k}: {v}" for k, v in PARAMS.items())
    (project / "params.yaml").write_text(f"spectrogram:\n{section}\n")
    shutil.copy(ROOT / "dvc.yaml", project)   # the stage's paths
    script = str(ROOT / "stages" / "spectrogram.py")
    done = subprocess.run([sys.executable, script], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("spectrogram: 4 done")
    assert np.load(project / "data" / "spectrograms" / "shard-00000.npy", mmap_mode="r").shape == (3, 598, 257, 2)

    (project / "params.yaml").write_text(f"spectrogram:\n{section.replace('float16', 'int8')}\n")
    done = subprocess.run([sys.executable, script], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("spectrogram: params.yaml: spectrogram.dtype = 'int8': "
                                   "expected one of ['float16', 'float32']")
