"""The speaker_embeddings stage on real speech: GE2E embeddings equal resemblyzer's own, a clip
without voice is skipped with its reason, a rerun reuses finished shards, and the evaluation's
loader reads what the stage wrote."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speech2face.core import shards
from speech2face.core.params import build_config
from speech2face.core.tables import read_table
from speech2face.data import extract_files as extracted
from speech2face.data.speaker_embeddings import SpeakerEmbeddingsConfig, load_speaker_embeddings, run_speaker_embeddings

ROOT = Path(__file__).resolve().parents[2]
LIBRISPEECH = ROOT.parent / "shared" / "media" / "speech" / "librispeech"
SR = 16000

pytestmark = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"{LIBRISPEECH} (the shared real media) is absent")


def _speech(name: str) -> np.ndarray:
    import soundfile

    audio, rate = soundfile.read(LIBRISPEECH / name.split("-")[0] / f"{name}.flac", dtype="int16")
    assert rate == SR
    return audio[:8 * SR]


def _write_extract_shard(folder: Path, name: str, clips: dict[str, np.ndarray], failed: dict[str, str]) -> None:
    frame = extracted.encode_jpeg(np.full((8, 8, 3), 128, np.uint8))
    ids = list(clips)
    extracted.save_shard(folder / f"{name}.npz", ids, [clips[i] for i in ids], [[frame] for _ in ids], SR)
    shards.write_shard_table(folder, name, pd.DataFrame({
        "clip_id": ids + list(failed), "youtube_id": ids + list(failed), "x": 0.5, "y": 0.5,
        "status": ["ok"] * len(ids) + ["failed"] * len(failed), "reason": [""] * len(ids) + list(failed.values()),
        "audio_seconds": [round(len(clips[i]) / SR, 4) for i in ids] + [0.0] * len(failed)}))


@pytest.fixture()
def extract_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "extracted"
    folder.mkdir()
    _write_extract_shard(folder, "shard-00000", {
        "a1": _speech("1688-142285-0000"), "a2": _speech("1688-142285-0001"),
        "silent": np.zeros(3 * SR, np.int16),
    }, failed={"broken": "no_audio"})
    _write_extract_shard(folder, "shard-00001", {"b1": _speech("2609-156975-0000"),
                                                 "b2": _speech("2609-156975-0001")}, failed={})
    return folder


def _config(**changes) -> SpeakerEmbeddingsConfig:
    return build_config(SpeakerEmbeddingsConfig, {"workers": 2, **changes})


def test_stage_embeds_real_speech_as_resemblyzer_does(extract_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "speaker_embeddings"
    index = run_speaker_embeddings(extract_dir, out, _config())
    by_clip = index.set_index("clip_id")
    assert list(index["clip_id"]) == ["a1", "a2", "silent", "b1", "b2"]   # failed upstream: counted, not listed
    assert (by_clip.loc["silent", "status"], by_clip.loc["silent", "reason"]) == ("skipped", "no_voice")
    assert (by_clip.loc[["a1", "a2", "b1", "b2"], "status"] == "ok").all()
    assert list(by_clip.loc[["a1", "a2", "b1", "b2"], "row"]) == [0, 1, 0, 1]
    assert "speaker_embeddings: 4 done, 2 skipped (extract_failed: 1, no_voice: 1)" in capsys.readouterr().out
    embeddings = load_speaker_embeddings(out)
    assert sorted(embeddings) == ["a1", "a2", "b1", "b2"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import VoiceEncoder, preprocess_wav
    theirs = VoiceEncoder("cpu", verbose=False)
    for clip_id in embeddings:
        wav = preprocess_wav(_speech({"a1": "1688-142285-0000", "a2": "1688-142285-0001",
                                      "b1": "2609-156975-0000", "b2": "2609-156975-0001"}[clip_id]) / 32768.0,
                             source_sr=None)
        reference = theirs.embed_utterance(wav)
        assert embeddings[clip_id].shape == (256,) and embeddings[clip_id].dtype == np.float32
        assert float(embeddings[clip_id] @ reference) > 0.9999, clip_id
    # a speaker's two recordings are closer to each other than to the other speaker's
    same = min(embeddings["a1"] @ embeddings["a2"], embeddings["b1"] @ embeddings["b2"])
    different = max(embeddings[a] @ embeddings[b] for a in ("a1", "a2") for b in ("b1", "b2"))
    assert same > different + 0.1


def test_rerun_reuses_finished_shards_and_a_changed_setting_starts_over(extract_dir: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "speaker_embeddings"
    run_speaker_embeddings(extract_dir, out, _config())
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    capsys.readouterr()
    run_speaker_embeddings(extract_dir, out, _config(workers=1))   # how fast, not what: reused
    assert "0 done, 5 reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    before = load_speaker_embeddings(out)
    run_speaker_embeddings(extract_dir, out, _config(preprocess=False))   # another output: recomputed
    assert "reused" not in capsys.readouterr().out
    index = read_table(out / "index.csv")
    assert index.set_index("clip_id").loc["silent", "reason"] == "no_voice"   # all zeros, whatever the VAD
    after = load_speaker_embeddings(out)
    for clip_id in before:   # the same voice without the VAD's cuts: close, not equal
        assert 0.8 < float(before[clip_id] @ after[clip_id]) < 0.99999, clip_id
