"""The embedded sample corpus (data/sample/) and its generator (speech2face.sample_corpus).

Checks the committed files against what the issue asks (AVSpeech format, 90 identities x 3
segments, real faces at x, y, speech, size) on a few sampled rows, the documented bad rows,
and the generator's voice<->face function, with real espeak-ng, ffmpeg and dlib.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speech2face.sample_corpus.identities import (
    FaceParams, Latent, VoiceParams, face_params, identity_latent, voice_params)
from speech2face.sample_corpus.identities import youtube_id as make_youtube_id
from speech2face.sample_corpus.portraits import (
    EYE_LEFT, EYE_RIGHT, PORTRAIT_H, PORTRAIT_W, BaseFace, _border_points, eye_similarity,
    load_base_faces, make_face_image, morph_target)
from speech2face.sample_corpus.scene import FRAME_H, FRAME_W, face_at, face_boxes
from speech2face.sample_corpus.speech import (
    AUDIO_RATE, SENTENCES, private_espeak, speak, speech_bounds)
from speech2face.sample_corpus.video import mux_video
from speech2face.sample_corpus.corpus import (
    BAD_INDEX_BASE, BAD_KINDS, CLIPS_PER_IDENTITY, DEFAULT_SEED, HOSTILE_PATH_ID, HOSTILE_SHELL_ID,
    N_IDENTITIES, TEST_EVERY, CorpusBuilder, format_row, has_distractor, is_test_identity, write_csv)
from speech2face.data.avspeech import BadRow, ClipRow, read_csv
from speech2face.core.fsutil import is_safe_id
from speech2face.data.media import MediaError, probe

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
CSV_PATH = SAMPLE / "avspeech_sample.csv"
FACES = ROOT.parent / "shared" / "media" / "faces"
REGENERATE = "regenerate it with: .venv/bin/python scripts/make_sample_corpus.py"

needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"shared portraits absent: {FACES}")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rows() -> list[ClipRow | BadRow]:
    assert CSV_PATH.is_file(), f"{CSV_PATH} missing; {REGENERATE}"
    return read_csv(CSV_PATH)


@pytest.fixture(scope="module")
def identities() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "identities.csv", dtype={"youtube_id": str})


@pytest.fixture(scope="module")
def good_rows(rows, identities) -> dict[str, list[ClipRow]]:
    """The identities' rows, by youtube_id, in CSV order."""
    ids = set(identities["youtube_id"])
    by_id: dict[str, list[ClipRow]] = defaultdict(list)
    for row in rows:
        if isinstance(row, ClipRow) and row.youtube_id in ids:
            by_id[row.youtube_id].append(row)
    return by_id


def test_eye_similarity_maps_the_eyes_exactly():
    source = np.array([[310.0, 420.0], [402.0, 401.0]])
    matrix = eye_similarity(source, np.array([EYE_LEFT, EYE_RIGHT]))
    mapped = (matrix @ np.c_[source, np.ones(2)].T).T[:, :2]
    assert np.allclose(mapped, [EYE_LEFT, EYE_RIGHT])
    assert np.allclose(matrix[:2, :2] @ matrix[:2, :2].T, np.eye(2) * np.linalg.det(matrix[:2, :2]))


@pytest.fixture(scope="module")
def bases() -> list[BaseFace]:
    if not FACES.is_dir():
        pytest.skip(f"shared portraits absent: {FACES}")
    return load_base_faces(FACES)


def video_path(youtube_id: str) -> Path:
    return SAMPLE / "videos" / f"{youtube_id}.mp4"


def frame_at(path: Path, seconds: float) -> np.ndarray:
    """The decoded RGB frame at ``seconds`` (real ffmpeg, accurate seek)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-ss", f"{seconds:.3f}", "-i", str(path),
                          "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(out, np.uint8).reshape(FRAME_H, FRAME_W, 3)


def stream_codecs(path: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def median_f0(audio: np.ndarray) -> float:
    import librosa

    f0 = librosa.yin(audio.astype(np.float64), fmin=60, fmax=400, sr=AUDIO_RATE)
    return float(np.median(f0))


# --------------------------------------------------------------------------- the CSV


def test_csv_is_avspeech_format_without_header(rows):
    first = CSV_PATH.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert len(first) == 5 and is_safe_id(first[0]) and float(first[1]) < float(first[2])
    good = [r for r in rows if isinstance(r, ClipRow)]
    bad = [r for r in rows if isinstance(r, BadRow)]
    # 270 identity rows + the 5 bad rows that are well-formed (their problem is the media)
    assert len(good) == N_IDENTITIES * CLIPS_PER_IDENTITY + 5
    assert sorted(r.reason.split(":")[0] for r in bad) == ["malformed_row", "unsafe_id", "unsafe_id"]


def test_test_csv_is_the_rows_of_every_fifth_identity(identities):
    """avspeech_sample_test.csv (faces.split_by: csv) holds, line for line, the main CSV's
    rows of identities 4, 9, ..., 89, as the generator writes it."""
    test_ids = set(identities.loc[[is_test_identity(i) for i in identities["index"]], "youtube_id"])
    assert len(test_ids) == N_IDENTITIES // TEST_EVERY
    expected = [line for line in CSV_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.split(",")[0] in test_ids]
    assert len(expected) == len(test_ids) * CLIPS_PER_IDENTITY
    assert (SAMPLE / "avspeech_sample_test.csv").read_text(encoding="utf-8") == "".join(expected), REGENERATE


def test_ninety_identities_with_three_segments_of_one_video_each(good_rows, identities):
    assert len(identities) == N_IDENTITIES == len(good_rows)
    assert all(len(segments) == CLIPS_PER_IDENTITY for segments in good_rows.values())
    for youtube_id in good_rows:
        assert re.fullmatch(r"[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]", youtube_id), youtube_id
        assert not youtube_id.startswith("-")
        assert video_path(youtube_id).is_file()


def test_segments_vary_in_length_and_are_separated_by_gaps(good_rows):
    lengths = []
    for segments in good_rows.values():
        for before, after in zip(segments, segments[1:]):
            assert after.start - before.end >= 0.5, (before, after)
        lengths += [s.duration for s in segments]
    lengths = np.array(lengths)
    assert lengths.min() >= 1.5 and lengths.max() <= 9.5
    assert (lengths < 4).sum() >= 30 and (lengths > 6).sum() >= 30     # short and long clips
    assert (lengths < 6).sum() >= 90


def test_each_identity_says_three_different_sentences(good_rows):
    transcripts = pd.read_csv(SAMPLE / "transcripts.csv", dtype={"youtube_id": str})
    assert len(transcripts) == sum(len(s) for s in good_rows.values())
    for youtube_id, group in transcripts.groupby("youtube_id"):
        assert group["text"].nunique() == CLIPS_PER_IDENTITY
        assert set(group["text"]) <= set(SENTENCES)
        segments = good_rows[youtube_id]
        assert np.allclose(group["start"], [s.start for s in segments])
        assert np.allclose(group["end"], [s.end for s in segments])


def test_corpus_fits_the_size_budget():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert 5e6 < total <= 20e6, f"{total / 1e6:.1f} MB"


def test_faces_are_off_centre_for_many_identities(good_rows):
    xs = np.array([segments[0].x for segments in good_rows.values()])
    assert xs.min() < 0.35 and xs.max() > 0.65
    assert ((xs < 0.42) | (xs > 0.58)).sum() >= 30


# --------------------------------------------------------------------------- sampled media


def sampled_rows(good_rows) -> list[ClipRow]:
    """A few rows, not all (speed): the first, a distractor identity's, the leftmost and
    rightmost faces, the longest segment."""
    every = [r for segments in good_rows.values() for r in segments]
    distractor_id = make_youtube_id(DEFAULT_SEED, 7)
    assert has_distractor(7)
    picks = [every[0], good_rows[distractor_id][1], min(every, key=lambda r: r.x),
             max(every, key=lambda r: r.x), max(every, key=lambda r: r.duration)]
    return picks


def test_sampled_rows_have_video_audio_and_a_face_at_x_y(good_rows):
    for row in sampled_rows(good_rows):
        path = video_path(row.youtube_id)
        info = probe(path)
        assert stream_codecs(path) == ["aac,audio", "h264,video"]
        assert (info.width, info.height) == (FRAME_W, FRAME_H)
        assert 0 < row.start < row.end <= info.duration
        frame = frame_at(path, (row.start + row.end) / 2)
        point = (row.x * FRAME_W - 0.5, row.y * FRAME_H - 0.5)
        box = face_at(frame, point, tolerance=0.3)
        assert box is not None, f"no HOG face at {point} in {row}: {face_boxes(frame)}"
        assert box[1] - box[3] >= 80          # large enough for HOG without upsampling


def test_distractor_video_has_two_faces_and_x_y_picks_the_large_one(good_rows):
    row = good_rows[make_youtube_id(DEFAULT_SEED, 7)][0]
    frame = frame_at(video_path(row.youtube_id), (row.start + row.end) / 2)
    boxes = face_boxes(frame)
    assert len(boxes) == 2
    chosen = face_at(frame, (row.x * FRAME_W - 0.5, row.y * FRAME_H - 0.5))
    assert chosen == max(boxes, key=lambda b: b[1] - b[3])


def test_segments_hold_speech_and_gaps_are_quieter(good_rows):
    """Audio decoded from the mp4: the segment is speech, the silence before it is not."""
    row = next(iter(good_rows.values()))[0]
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(video_path(row.youtube_id)),
                          "-f", "s16le", "-ac", "1", "-ar", str(AUDIO_RATE), "pipe:"],
                         check=True, capture_output=True).stdout
    audio = np.frombuffer(out, np.int16).astype(np.float64) / 32768
    inside = audio[int(row.start * AUDIO_RATE):int(row.end * AUDIO_RATE)]
    lead_in = audio[:int((row.start - 0.05) * AUDIO_RATE)]
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    assert rms(inside) > 0.05 and rms(lead_in) < 0.01


# --------------------------------------------------------------------------- bad rows


def bad_id(kind: str) -> str:
    return make_youtube_id(DEFAULT_SEED, BAD_INDEX_BASE + BAD_KINDS.index(kind))


def test_bad_rows_are_what_the_readme_says(rows):
    by_id = {r.youtube_id: r for r in rows if isinstance(r, ClipRow)}
    missing = bad_id("missing_video")
    assert missing in by_id and not video_path(missing).exists()

    no_audio = probe(video_path(bad_id("no_audio")))
    assert no_audio.has_video and not no_audio.has_audio

    with pytest.raises(MediaError):
        probe(video_path(bad_id("truncated_file")))

    late = by_id[bad_id("segment_out_of_range")]
    assert late.start > probe(video_path(late.youtube_id)).duration

    no_face = by_id[bad_id("no_face")]
    path = video_path(no_face.youtube_id)
    assert probe(path).has_audio
    assert face_boxes(frame_at(path, (no_face.start + no_face.end) / 2)) == []

    with open(CSV_PATH, newline="", encoding="utf-8") as f:
        raw = list(csv.reader(f))
    assert raw[-3] == [bad_id("malformed_row"), "1.000000", "4.000000", "0.500000"]
    assert raw[-2][0] == HOSTILE_PATH_ID and raw[-1][0] == HOSTILE_SHELL_ID
    assert len(raw[-1]) == 5          # the comma inside the hostile id stayed quoted

    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    for kind in BAD_KINDS:
        token = {"hostile_path_id": HOSTILE_PATH_ID, "hostile_shell_id": "$(touch pwned)"}.get(kind)
        assert (token or bad_id(kind)) in readme, kind


# --------------------------------------------------------------------------- the generator


def test_identities_csv_is_the_documented_function_of_the_latent(identities):
    for record in identities.itertuples():
        latent = identity_latent(DEFAULT_SEED, record.index)
        assert record.youtube_id == make_youtube_id(DEFAULT_SEED, record.index)
        assert (record.w_obama, record.w_biden, record.w_collins) == latent.weights
        assert (record.width, record.tint) == (latent.width, latent.tint)
        voice = voice_params(latent)
        assert (record.gender, record.pitch_base_hz, record.formant_percent, record.speed_wpm,
                record.word_gap) == (voice.gender, voice.pitch_base_hz, voice.formant_percent,
                                     voice.speed_wpm, voice.word_gap)
    # the latent spreads over its whole range
    assert identities["w_collins"].max() > 0.8 and identities["w_collins"].min() < 0.05
    assert (identities["gender"] == "female").sum() >= 10


def test_voice_params_worked_example_and_monotonicity():
    latent = Latent((0.2, 0.3, 0.5), 1.0, 0.0)
    assert voice_params(latent) == VoiceParams(
        gender="male", pitch_base_hz=135, pitch_top_hz=196, formant_percent=106, speed_wpm=156,
        word_gap=2)
    # more Collins -> higher pitch and formants, female from 0.5 on
    collins = [voice_params(Latent((0.9 - c, 0.1, c), 1.0, 0.0)) for c in (0.0, 0.3, 0.6, 0.9)]
    assert [v.pitch_base_hz for v in collins] == [85, 115, 145, 175]
    assert np.all(np.diff([v.formant_percent for v in collins]) > 0)
    assert [v.gender for v in collins] == ["male", "male", "female", "female"]
    # wider face -> lower formants; Obama side -> faster; darker tint -> longer word gaps
    widths = [voice_params(Latent((0.4, 0.3, 0.3), w, 0.0)).formant_percent for w in (0.88, 1.0, 1.12)]
    assert widths[0] > widths[1] > widths[2]
    speeds = [voice_params(Latent((o, 0.8 - o, 0.2), 1.0, 0.0)).speed_wpm for o in (0.0, 0.4, 0.8)]
    assert speeds == [128, 160, 192]
    gaps = [voice_params(Latent((0.4, 0.3, 0.3), 1.0, t)).word_gap for t in (-1.0, 0.0, 1.0)]
    assert gaps == [0, 2, 3]


def test_face_params_follow_the_latent():
    params = face_params(Latent((0.5, 0.25, 0.25), 1.1, 0.5))
    assert params.weights == (0.5, 0.25, 0.25) and params.width_scale == 1.1
    assert params.tint_rgb == pytest.approx((0.95, 0.91, 0.87))


def test_latents_and_ids_are_deterministic_and_distinct():
    again = [(identity_latent(DEFAULT_SEED, i), make_youtube_id(DEFAULT_SEED, i)) for i in range(5)]
    assert again == [(identity_latent(DEFAULT_SEED, i), make_youtube_id(DEFAULT_SEED, i))
                     for i in range(5)]
    assert identity_latent(DEFAULT_SEED, 0) != identity_latent(DEFAULT_SEED + 1, 0)
    assert sum(identity_latent(DEFAULT_SEED, 3).weights) == pytest.approx(1.0, abs=1e-5)


def test_espeak_voice_really_follows_the_parameters():
    """Real espeak-ng: more Collins weight is audibly higher; a faster voice is shorter."""
    sentence = "The old lighthouse still works, although no ship has needed it for years."
    low = voice_params(Latent((0.45, 0.45, 0.1), 1.0, 0.0))
    high = voice_params(Latent((0.05, 0.05, 0.9), 1.0, 0.0))
    fast = voice_params(Latent((0.85, 0.05, 0.1), 1.0, 0.0))
    with private_espeak() as root:
        low_audio = speak(sentence, low, root, "low")
        high_audio = speak(sentence, high, root, "high")
        fast_audio = speak(sentence, fast, root, "fast")
        again = speak(sentence, low, root, "low")
        # no variant file is left behind: espeak-ng lists at most ~350 voice files and failed
        # after ~210 identities per worker when they piled up (a corpus of 600 identities)
        assert not list((root / "espeak-ng-data" / "voices" / "!v").iterdir())
    assert np.array_equal(low_audio, again)
    assert median_f0(high_audio) > 1.5 * median_f0(low_audio)
    assert 0.6 * high.pitch_base_hz < median_f0(high_audio) < 1.6 * high.pitch_top_hz
    duration = lambda a: np.subtract(*speech_bounds(a)[::-1]) / AUDIO_RATE  # noqa: E731
    assert duration(fast_audio) < 0.85 * duration(low_audio)


def test_mux_is_bit_exact(tmp_path):
    frames = [np.full((FRAME_H, FRAME_W, 3), 40 + 10 * i, np.uint8) for i in range(6)]
    audio = np.sin(np.arange(AUDIO_RATE // 2) * 2 * np.pi * 220 / AUDIO_RATE).astype(np.float32) * 0.3
    for name in ("a.mp4", "b.mp4"):
        mux_video(iter(frames), len(frames), audio, tmp_path / name)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert stream_codecs(tmp_path / "a.mp4") == ["aac,audio", "h264,video"]


def test_csv_writer_keeps_hostile_ids_in_one_field(tmp_path):
    path = tmp_path / "rows.csv"
    write_csv([[HOSTILE_SHELL_ID, "1.000000", "2.000000", "0.5", "0.5"]], path)
    parsed = read_csv(path)
    assert len(parsed) == 1 and isinstance(parsed[0], BadRow) and parsed[0].reason.startswith("unsafe_id")


@needs_faces
def test_morph_is_skimage_piecewise_affine_warp(bases):
    """make_face_image with one-hot weights equals skimage's PiecewiseAffineTransform warp."""
    from skimage.transform import PiecewiseAffineTransform, warp

    params = FaceParams(weights=(0.0, 1.0, 0.0), width_scale=1.08, tint_rgb=(1.0, 1.0, 1.0))
    ours = make_face_image(bases, params).astype(int)
    border = _border_points(PORTRAIT_W, PORTRAIT_H)
    target_points = np.concatenate([morph_target(bases, params), border])
    source_points = np.concatenate([bases[1].landmarks, border])
    if hasattr(PiecewiseAffineTransform, "from_estimate"):      # scikit-image >= 0.26
        transform = PiecewiseAffineTransform.from_estimate(target_points, source_points)
    else:
        transform = PiecewiseAffineTransform()
        assert transform.estimate(target_points, source_points)
    theirs = warp(bases[1].image.astype(np.float64), transform, order=1, mode="edge")
    theirs = np.round(np.clip(theirs, 0, 1) * 255).astype(int)
    assert np.abs(ours - theirs).max() <= 1
    # and the face really got wider: the jaw of the target is 8% wider than Biden's
    target = morph_target(bases, params)
    jaw = lambda p: p[16, 0] - p[0, 0]  # noqa: E731
    assert jaw(target) == pytest.approx(1.08 * jaw(bases[1].landmarks))


@needs_faces
def test_face_embeddings_move_along_the_latent(bases):
    """dlib's 128-D embedding of the morph drifts away from Obama as the Biden weight grows."""
    import face_recognition

    embeddings = []
    for w_biden in (0.0, 0.25, 0.5, 0.75, 1.0):
        image = make_face_image(bases, face_params(Latent((1 - w_biden, w_biden, 0.0), 1.0, 0.0)))
        boxes = face_recognition.face_locations(image)
        assert len(boxes) == 1
        embeddings.append(face_recognition.face_encodings(image, boxes)[0])
    from_obama = [float(np.linalg.norm(e - embeddings[0])) for e in embeddings]
    assert np.all(np.diff(from_obama) > 0), from_obama
    assert from_obama[-1] > 0.6       # dlib's same-person threshold; the ends are two people


@needs_faces
def test_regenerating_two_identities_gives_the_committed_rows(bases, good_rows):
    """The committed CSV is what the generator makes now (identity 7 has the distractor)."""
    with private_espeak() as root:
        builder = CorpusBuilder(DEFAULT_SEED, bases, root)
        for index in (0, 7):
            video = builder.identity_video(index)
            committed = good_rows[make_youtube_id(DEFAULT_SEED, index)]
            assert [format_row(r) for r in video.rows()] == \
                [[r.youtube_id, *(f"{v:.6f}" for v in (r.start, r.end, r.x, r.y))] for r in committed]
            assert math.isclose(probe(video_path(video.youtube_id)).video_duration, video.duration,
                                abs_tol=0.01)


UNDETECTABLE_IDENTITY = 294    # of DEFAULT_SEED: a morph whose face HOG misses (met generating 600 identities)


@needs_faces
def test_an_undetectable_identity_stops_the_sample_but_is_left_out_of_a_large_corpus(bases, tmp_path):
    """The embedded sample is strict (every face detectable, else the generator stops); a
    large corpus (``--skip-undetectable``) leaves such an identity out: no rows, no video."""
    from speech2face.sample_corpus import corpus
    from speech2face.sample_corpus.video import NoDetectableFace

    corpus._start_worker(DEFAULT_SEED, bases, str(tmp_path))
    task = ("identity", UNDETECTABLE_IDENTITY, str(tmp_path))
    with pytest.raises(NoDetectableFace, match="no HOG face"):
        corpus._run_task((*task, True))
    assert corpus._run_task((*task, False)) == ([], None)
    assert not list(tmp_path.glob("*.mp4"))
    rows, record = corpus._run_task(("identity", 1, str(tmp_path), False))   # a detectable one is kept
    assert len(rows) == CLIPS_PER_IDENTITY and record.youtube_id == make_youtube_id(DEFAULT_SEED, 1)
