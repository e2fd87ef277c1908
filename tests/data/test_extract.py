"""Extract stage on real media: CREMA-D FLV (VP6 + MP3) clips, plus broken files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speech2face.data import extract_files as extracted
from speech2face.core.workers import WorkerPool
from speech2face.data.extract import ExtractConfig, crashed_clip, extract_clip, run_extract
from speech2face.data.faces import FacesConfig, run_faces
from speech2face.data.spectrogram import SpectrogramConfig, run_spectrogram
from speech2face.data.media import probe
from speech2face.core.tables import read_table, write_table

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"
CREMAD = MEDIA / "av" / "cremad"
pytestmark = pytest.mark.skipif(not CREMAD.is_dir(), reason=f"real media folder {CREMAD} absent")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture()
def clips(tmp_path: Path) -> tuple[Path, Path]:
    """A download manifest over real FLV clips, an MP3 without video, a video without
    audio, a truncated file and a clip the manifest names but that is missing."""
    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    rows = []
    flvs = sorted(CREMAD.glob("1001_*.flv"))[:3]
    for i, src in enumerate(flvs):
        shutil.copy(src, clips_dir / f"flv{i}.flv")
        rows.append((f"flv{i}", f"flv{i}.flv"))
    shutil.copy(CREMAD / "1002_DFA_ANG_XX.mp3", clips_dir / "audioonly.mp3")
    rows.append(("audioonly", "audioonly.mp3"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=2", "-pix_fmt", "yuv420p",
            str(clips_dir / "silentvideo.mp4"))
    rows.append(("silentvideo", "silentvideo.mp4"))
    data = (clips_dir / "flv0.flv").read_bytes()
    (clips_dir / "truncated.flv").write_bytes(data[:400])
    rows.append(("truncated", "truncated.flv"))
    rows.append(("missing", "missing.mp4"))
    manifest = pd.DataFrame({
        "clip_id": [r[0] for r in rows], "youtube_id": [r[0] for r in rows],
        "x": 0.5, "y": 0.4, "status": "ok", "reason": "", "path": [str(clips_dir / r[1]) for r in rows],
    })
    manifest.loc[len(manifest)] = ["dead", "dead", 0.5, 0.5, "failed", "http_404", ""]
    write_table(manifest, tmp_path / "download.csv")
    return tmp_path / "download.csv", clips_dir


def test_extract_real_flv_and_bad_files(clips, tmp_path: Path, capsys) -> None:
    manifest_path, clips_dir = clips
    out = tmp_path / "extracted"
    table = run_extract(manifest_path, clips_dir, out, ExtractConfig(frames_per_clip=3, sample_rate=16000,
                                                                      frame_max_side=320, shard_size=4, workers=2))
    status = dict(zip(table["clip_id"], zip(table["status"], table["reason"])))
    assert status["flv0"] == ("ok", "") and status["flv1"] == ("ok", "") and status["flv2"] == ("ok", "")
    assert status["audioonly"] == ("failed", "no_video")
    assert status["silentvideo"] == ("failed", "no_audio")
    # 400 bytes: the header survives, no stream does
    assert status["truncated"][0] == "failed" and status["truncated"][1] in ("no_video", "undecodable")
    assert status["missing"] == ("failed", "missing_clip_file")
    assert "dead" not in status  # failed downloads are counted, not extracted
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("extract: 3 done") and "download_failed: 1" in line and "no_audio: 1" in line and "no_video: 2" in line

    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.csv", "shard-00000.npz", "shard-00001.csv", "shard-00001.npz"]
    shard = extracted.load_shard(out / "shard-00000.npz")
    assert shard.clip_ids == ["flv0", "flv1", "flv2"]
    for i, clip_id in enumerate(shard.clip_ids):
        audio = shard.audio(i)
        seconds = probe(clips_dir / f"{clip_id}.flv").duration
        assert audio.dtype == np.int16 and abs(len(audio) / 16000 - seconds) < 0.1
        assert np.sqrt(np.mean(shard.audio_float(i) ** 2)) > 0.01  # real speech, not silence
        frames = shard.frames(i)
        assert len(frames) == 3 and frames[0].shape == (240, 320, 3)  # 480x360 scaled to fit 320
        assert not np.array_equal(frames[0], frames[2])  # spread through the clip, not one frame
    assert read_table(out / "index.csv")["shard"].tolist().count("shard-00000") == 4


def test_extract_resumes_finished_shards(clips, tmp_path: Path, capsys) -> None:
    manifest_path, clips_dir = clips
    out = tmp_path / "extracted"
    kwargs = dict(frames_per_clip=2, sample_rate=16000, frame_max_side=320, shard_size=4, workers=1)
    run_extract(manifest_path, clips_dir, out, ExtractConfig(**kwargs))
    first = out / "shard-00000.npz"
    stamp = first.stat().st_mtime_ns
    (out / "shard-00001.csv").unlink()  # as if killed before the second shard finished
    (out / ".tmp-shard-00001-x.npz").write_bytes(b"half")
    capsys.readouterr()
    run_extract(manifest_path, clips_dir, out, ExtractConfig(**kwargs))
    assert first.stat().st_mtime_ns == stamp
    assert not list(out.glob(".tmp-*"))
    assert "4 reused from an earlier run" in capsys.readouterr().out
    assert (out / "shard-00001.csv").exists()


def test_real_flv_clips_through_spectrogram_and_faces(clips, tmp_path: Path) -> None:
    """The CREMA-D FLV (VP6 video, MP3 audio) clips end to end through the data stages."""
    manifest_path, clips_dir = clips
    run_extract(manifest_path, clips_dir, tmp_path / "ex", ExtractConfig(frames_per_clip=3, sample_rate=16000,
                                                                         frame_max_side=480, shard_size=8, workers=2))
    index = run_spectrogram(tmp_path / "ex", tmp_path / "spec", SpectrogramConfig(dtype="float32", batch_size=8))
    ok = index[index["status"] == "ok"]
    assert sorted(ok["clip_id"]) == ["flv0", "flv1", "flv2"]
    array = np.load(tmp_path / "spec" / f"{ok.iloc[0]['shard']}.npy", mmap_mode="r")
    assert array.shape == (3, 598, 257, 2)  # ~2 s of speech looped to 6 s
    assert np.isfinite(array).all() and np.abs(array).max() > 0.1
    faces = run_faces(tmp_path / "ex", tmp_path / "faces", FacesConfig(workers=1))
    found = faces[faces["status"] == "ok"]
    assert sorted(found["clip_id"]) == ["flv0", "flv1", "flv2"]  # the actor's face, in every clip
    features = np.load(tmp_path / "faces" / "features-00000.npy")
    # one actor: his three clips embed close together (dlib's same-person threshold is 0.6)
    assert max(np.linalg.norm(a - b) for a in features for b in features) < 0.6


def decode_or_crash(clip_id: str, *rest):
    """extract_clip, except that a clip named crash* kills its process with a real SIGSEGV,
    as a decoder bug on a hostile file would (in-process FFmpeg cannot catch that)."""
    if clip_id.startswith("crash"):
        import ctypes

        ctypes.string_at(0)
    return extract_clip(clip_id, *rest)


def test_a_decoder_crash_fails_only_its_clip(clips) -> None:
    _, clips_dir = clips
    ids = ["flv0", "crash0", "flv1", "flv2"]
    paths = [clips_dir / f"{'flv0' if i.startswith('crash') else i}.flv" for i in ids]
    calls = [(clip_id, path, 3, 16000, 320) for clip_id, path in zip(ids, paths)]
    with WorkerPool(2) as pool:
        results = list(pool.map(decode_or_crash, calls, on_crash=crashed_clip))
        assert [(r.clip_id, r.status, r.reason) for r in results] == [
            ("flv0", "ok", ""), ("crash0", "failed", "decoder_crashed"), ("flv1", "ok", ""), ("flv2", "ok", "")]
        assert all(len(r.frames) == 3 for r in results if r.status == "ok")
        again = list(pool.map(decode_or_crash, calls[2:], on_crash=crashed_clip))   # the next shard gets a working pool
        assert [r.status for r in again] == ["ok", "ok"]
