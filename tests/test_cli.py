"""``speech2face predict VOICE -o face.png``: the real command on real recordings.

Models: a tiny VoiceEncoder (width 1/32, magnitude input) and FaceDecoder (width 1/32) with
fixed seeds, saved with save_encoder/save_decoder as the pipeline saves them. Untrained as
they are, they would make every parity check below worthless: with default batch-norm
statistics (mean 0, variance 1) the encoder maps every recording to nearly the same feature
(cosine 0.999999 between different speakers), and the decoder's last layers start at std
1e-3, so every image is the flat mean texture and "pixel-exact" would hold for any audio.
So the encoder's batch-norm statistics are measured on real speech, the decoder gets real
mean landmarks (tests/fixtures/face_landmarks.npy), a real mean texture (astronaut.png), the
input standardisation of those features and visible last layers: then the features of the
six recordings below have cosines of 0.16-0.53 and their faces differ by 34-50 grey levels
per pixel on average (``test_the_faces_depend_on_the_voice`` keeps that so).

What is checked:
- the console script (subprocess of the installed ``speech2face``) with the default model
  paths under the working folder, its one-line error without a traceback, and MLflow
  ``runs:/`` URIs;
- on LibriSpeech FLAC (a looped, a cut, a 2-window and a 3-window recording) and CREMA-D
  (FLV video, MP3): a 224x224 RGB PNG pixel-identical to ``predict_face``, whose audio,
  windows and spectrograms are recomputed independently (soundfile or the ffmpeg command,
  cut by hand, numpy float64 STFT) and give the same feature;
- stereo and 44.1 kHz input; ``windows()``; every expected failure as one ``Error:`` line.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from speech2face.data.audio import SpectrogramSettings, spectrogram_batch
from speech2face.cli import main
from speech2face.models.face_decoder import FaceDecoder, load_decoder, save_decoder
from speech2face.models.encoder_io import load_encoder
from speech2face.models.voice_encoder import VoiceEncoder
from speech2face.voice_to_face import Prediction, load_voice, predict_face, windows
from voice_models import FEATURE_DIM, SETTINGS, WIDTH, write_models

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
LIBRISPEECH = MEDIA / "speech" / "librispeech"
CREMAD = MEDIA / "av" / "cremad"
NO_AUDIO_SAMPLE = ROOT / "data" / "sample" / "videos" / "Zv2dgw2ourQ.mp4"  # data/sample/README.md
CONSOLE_SCRIPT = Path(sys.executable).parent / "speech2face"

FFMPEG = shutil.which("ffmpeg")

needs_media = pytest.mark.skipif(not LIBRISPEECH.is_dir() or not CREMAD.is_dir(),
                                 reason=f"real media folder {MEDIA} absent")
# MLflow's own SQLAlchemy code, nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def flac_seconds(path: Path) -> float:
    import soundfile

    return soundfile.info(str(path)).duration


def pick_recordings() -> dict[str, Path]:
    """One LibriSpeech recording per path through ``windows()``: shorter than a window
    (looped), one to two windows (cut to the first), two windows, three windows; plus
    CREMA-D's FLV video and MP3 (44.1 kHz, ~2 s)."""
    if not LIBRISPEECH.is_dir() or not CREMAD.is_dir():
        return {}
    seconds = {path: flac_seconds(path) for path in sorted(LIBRISPEECH.rglob("*.flac"))}

    def first(low: float, high: float) -> Path:
        window = SETTINGS.seconds
        return next(path for path, length in seconds.items() if low * window <= length < high * window)

    return {"looped": first(0, 1), "one_window": first(1, 2), "two_windows": first(2, 3),
            "three_windows": first(3, 4), "cremad_flv": sorted(CREMAD.glob("*.flv"))[0],
            "cremad_mp3": sorted(CREMAD.glob("*.mp3"))[0]}


RECORDINGS = pick_recordings()


# --- models -------------------------------------------------------------------------------


@dataclass
class Models:
    folder: Path                 # holds models/voice_encoder.pt etc., the CLI's defaults
    encoder_path: Path
    decoder_path: Path
    encoder: VoiceEncoder        # loaded back from the files, as the CLI loads them
    decoder: FaceDecoder
    mlflow_uri: str              # temporary SQLite store that gets the same files as artifacts
    mlflow_job: subprocess.Popen  # ... from this process (prints the run ids as JSON)


# Creating a SQLite store runs MLflow's migrations (~6 s, plus ~2.5 s importing mlflow): done
# in the background while the other tests run; the MLflow tests come last.
LOG_MODELS = """
import json, sys
import mlflow
store, encoder, decoder = sys.argv[1:]
mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
experiment = mlflow.create_experiment("cli-test", artifact_location=f"file://{store}/artifacts")
ids = {}
for name, path in (("encoder", encoder), ("decoder", decoder)):
    with mlflow.start_run(experiment_id=experiment, run_name=name) as run:
        mlflow.log_artifact(path, artifact_path="model")
        mlflow.log_artifact(path[:-len(".pt")] + ".json", artifact_path="model")
    ids[name] = run.info.run_id
    if name == "encoder":   # and as version 1 of a registered model
        client = mlflow.MlflowClient()
        client.create_registered_model("cli-encoder")
        client.create_model_version("cli-encoder", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
print(json.dumps(ids))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not LIBRISPEECH.is_dir() or not CREMAD.is_dir():
        pytest.skip(f"real media folder {MEDIA} absent")
    folder = tmp_path_factory.mktemp("cli-models")
    encoder_path, decoder_path, _ = write_models(folder)
    store = tmp_path_factory.mktemp("cli-mlflow")
    job = subprocess.Popen([sys.executable, "-c", LOG_MODELS, str(store), str(encoder_path), str(decoder_path)],
                           env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield Models(folder, encoder_path, decoder_path, load_encoder(encoder_path), load_decoder(decoder_path),
                     f"sqlite:///{store / 'mlflow.db'}", job)
    finally:
        if job.poll() is None:
            job.kill()
        job.communicate()


def model_args(models: Models) -> list[str]:
    return ["--encoder", str(models.encoder_path), "--decoder", str(models.decoder_path)]


def predict_cli(voice: Path, output: Path, *extra: str, env: dict | None = None):
    """The command in-process (click's runner): same code as the console script, without a
    second torch start-up; ``console_runs`` covers the installed script itself."""
    result = CliRunner().invoke(main, ["predict", str(voice), "-o", str(output), *extra], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (224, 224)
        return np.asarray(image).copy()


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit status 1, nothing on stdout, exactly one ``Error:`` line on stderr."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)          # no other exception escaped
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True, capture_output=True)


# --- independent reference: audio, windows, spectrogram -----------------------------------


def reference_samples(path: Path) -> np.ndarray:
    """16 kHz mono float samples without speech2face.data.media: soundfile for FLAC (no
    resampling needed), the ffmpeg command for the rest."""
    if path.suffix == ".flac":
        import soundfile

        samples, rate = soundfile.read(str(path), dtype="int16")
        assert rate == SETTINGS.sample_rate and samples.ndim == 1
    else:
        raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar",
                              str(SETTINGS.sample_rate), "-f", "s16le", "-"], check=True, capture_output=True).stdout
        samples = np.frombuffer(raw, np.int16)
    return samples.astype(np.float32) / 32768


def reference_windows(samples: np.ndarray, n: int) -> list[np.ndarray]:
    """Consecutive n-sample windows; one looped window (np.resize repeats) when shorter than
    two windows. (Only for recordings of at most 8 windows: no spreading.)"""
    count = len(samples) // n
    if count <= 1:
        return [np.resize(samples, n)]
    return [samples[k * n:(k + 1) * n] for k in range(count)]


def reference_spectrogram(clip: np.ndarray, s: SpectrogramSettings) -> np.ndarray:
    """float64 numpy: frames cut by hand, periodic Hann by its formula, each frame zero-padded
    at its end to n_fft, sgn(x)|x|^power on re and im."""
    x = clip.astype(np.float64)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(s.window) / s.window)
    starts = np.arange(0, len(x) - s.window + 1, s.hop)
    frames = np.zeros((len(starts), s.n_fft))
    frames[:, :s.window] = x[starts[:, None] + np.arange(s.window)] * hann
    spectrum = np.fft.rfft(frames, axis=1)
    parts = np.stack([spectrum.real, spectrum.imag], axis=-1)
    return np.sign(parts) * np.abs(parts) ** s.power


def reference_feature(path: Path, encoder: VoiceEncoder) -> np.ndarray:
    clips = reference_windows(reference_samples(path), SETTINGS.n_samples)
    batch = np.stack([reference_spectrogram(c, SETTINGS) for c in clips]).astype(np.float32)
    with torch.no_grad():
        return encoder(torch.from_numpy(batch)).mean(0).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# --- parity on real recordings -------------------------------------------------------------


@pytest.fixture(scope="module")
def direct(models):
    """``predict_face`` called directly, once per (recording, max_windows)."""
    @functools.cache
    def predict(kind: str, max_windows: int = 8) -> Prediction:
        return predict_face(RECORDINGS[kind], models.encoder, models.decoder, SETTINGS, max_windows=max_windows)
    return predict


EXPECTED_WINDOWS = {"looped": 1, "one_window": 1, "two_windows": 2, "three_windows": 3, "cremad_flv": 1,
                    "cremad_mp3": 1}


@needs_media
@pytest.mark.parametrize("kind", list(EXPECTED_WINDOWS))
def test_png_matches_predict_face_and_an_independent_computation(kind, models, direct, tmp_path) -> None:
    voice = RECORDINGS[kind]
    output = tmp_path / "nested" / "face.png"               # a missing folder is created
    result = predict_cli(voice, output, *model_args(models))
    assert result.exit_code == 0 and result.stderr == ""
    count = EXPECTED_WINDOWS[kind]
    assert result.stdout.endswith(f" s, {count} window{'s' if count > 1 else ''}) -> {output}\n")
    prediction = direct(kind)
    assert prediction.windows == count
    assert np.array_equal(read_png(output), prediction.image)    # the CLI adds nothing, loses nothing

    # the same audio from soundfile / the ffmpeg command, windows cut by hand, float64 numpy
    # spectrograms: the same feature up to float32 rounding (a wrong hop, window, power, loop
    # or window choice changes it by 10 % or more)
    assert np.array_equal(load_voice(voice, SETTINGS.sample_rate), reference_samples(voice))
    expected = reference_feature(voice, models.encoder)
    assert np.abs(prediction.feature - expected).max() < 3e-4 * np.abs(expected).max()
    assert cosine(prediction.feature, expected) > 1 - 1e-6


@needs_media
def test_the_faces_depend_on_the_voice(direct) -> None:
    """Guard for the parity tests: different recordings give different features and faces."""
    predictions = [direct(kind) for kind in RECORDINGS]
    for first, second in itertools.combinations(predictions, 2):
        assert cosine(first.feature, second.feature) < 0.8
        assert np.abs(first.image.astype(int) - second.image).mean() > 20
        assert np.abs(first.landmarks - second.landmarks).max() > 1.0


@needs_media
def test_max_windows_option(models, direct, tmp_path) -> None:
    result = predict_cli(RECORDINGS["three_windows"], tmp_path / "face.png", "--max-windows", "2",
                         *model_args(models))
    assert result.exit_code == 0 and result.stdout.endswith(f"2 windows) -> {tmp_path / 'face.png'}\n")
    two = direct("three_windows", max_windows=2)
    assert two.windows == 2 and np.array_equal(read_png(tmp_path / "face.png"), two.image)
    assert not np.array_equal(two.image, direct("three_windows").image)


# --- stereo, other sample rates ------------------------------------------------------------


@needs_media
def test_stereo_is_the_mean_of_its_channels(tmp_path) -> None:
    """ffmpeg's ac=1 averages the channels: a stereo file whose channels are 0.5x and 1.5x the
    mono recording decodes to the mono samples, give or take the last bit (the first channel
    alone would be half as loud, a sum twice)."""
    mono = RECORDINGS["one_window"]
    stereo = tmp_path / "stereo.wav"
    ffmpeg("-i", str(mono), "-af", "pan=stereo|c0=0.5*c0|c1=1.5*c0", "-c:a", "pcm_f32le", str(stereo))
    from_stereo, from_mono = load_voice(stereo, 16000), load_voice(mono, 16000)
    assert len(from_stereo) == len(from_mono)
    assert np.abs(from_stereo - from_mono).max() <= 1 / 32768
    assert np.abs(from_mono).max() > 0.1


@needs_media
def test_stereo_44k_recording_gives_the_mono_16k_face(models, direct, tmp_path) -> None:
    """A 44.1 kHz stereo WAV made from a 16 kHz mono FLAC: same feature within cosine 0.99
    (0.994 here: the 16 -> 44.1 -> 16 kHz round trip through ffmpeg's resampler, the one the
    extract stage uses, attenuates 7.3-8 kHz by 10-30 %), and its face is nearer to the mono
    one than to any other recording's."""
    stereo = tmp_path / "stereo44k.wav"
    ffmpeg("-i", str(RECORDINGS["one_window"]), "-af", "pan=stereo|c0=c0|c1=c0", "-ar", "44100", str(stereo))
    result = predict_cli(stereo, tmp_path / "stereo.png", *model_args(models))
    assert result.exit_code == 0, result.output
    from_stereo = predict_face(stereo, models.encoder, models.decoder, SETTINGS)
    assert np.array_equal(read_png(tmp_path / "stereo.png"), from_stereo.image)
    from_mono = direct("one_window")
    assert from_stereo.windows == from_mono.windows == 1
    assert abs(from_stereo.seconds - from_mono.seconds) < 1e-3
    assert cosine(from_stereo.feature, from_mono.feature) > 0.99
    own_distance = np.abs(from_stereo.image.astype(int) - from_mono.image).mean()
    for kind in RECORDINGS.keys() - {"one_window"}:
        assert cosine(from_stereo.feature, direct(kind).feature) < 0.8
        assert own_distance < np.abs(from_stereo.image.astype(int) - direct(kind).image).mean()


# --- windows() -----------------------------------------------------------------------------


N = SETTINGS.n_samples          # 6 s at 16 kHz


def ramp(seconds: float) -> np.ndarray:
    """Sample k = k: every window says where it came from."""
    return np.arange(int(seconds * SETTINGS.sample_rate), dtype=np.float32)


def starts(chunks: list[np.ndarray]) -> list[int]:
    assert all(len(c) == N and np.array_equal(c, np.arange(c[0], c[0] + N)) for c in chunks)
    return [int(c[0]) for c in chunks]


def test_twenty_seconds_give_three_consecutive_windows() -> None:
    assert starts(windows(ramp(20), N, max_windows=8)) == [0, N, 2 * N]
    assert starts(windows(ramp(18), N, max_windows=8)) == [0, N, 2 * N]
    assert starts(windows(ramp(17.99), N, max_windows=8)) == [0, N]


def test_short_recording_is_one_looped_window() -> None:
    three = ramp(3) / 1e5
    chunks = windows(three, N, max_windows=8)
    assert len(chunks) == 1 and np.array_equal(chunks[0], three)
    looped = np.concatenate([three, three])                                  # exactly 6 s
    assert np.array_equal(spectrogram_batch(chunks, SETTINGS), spectrogram_batch([looped], SETTINGS))
    # one to two windows: one window, the first 6 s
    eleven = ramp(11.9)
    (only,) = windows(eleven, N, max_windows=8)
    assert np.array_equal(spectrogram_batch([only], SETTINGS), spectrogram_batch([eleven[:N]], SETTINGS))


def test_max_windows_spreads_evenly_over_the_recording() -> None:
    minute = ramp(60)                                                        # 10 windows
    assert starts(windows(minute, N, max_windows=10)) == [k * N for k in range(10)]
    assert starts(windows(minute, N, max_windows=4)) == [0, 3 * N, 6 * N, 9 * N]
    assert starts(windows(minute, N, max_windows=3)) == [0, 4 * N + N // 2, 9 * N]   # first, middle, last
    assert starts(windows(minute, N, max_windows=2)) == [0, 9 * N]
    assert len(windows(minute, N, max_windows=1)) == 1


# --- one-line errors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-bad-media")
    paths = {name: folder / name for name in ("video_only.mp4", "random.wav", "empty.wav", "truncated.flac",
                                               "garbled.flac", "garbled.mp3", "silent.wav")}
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-t", "1", "-c:v", "mpeg4", str(paths["video_only.mp4"]))
    noise = np.random.default_rng(7).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    paths["random.wav"].write_bytes(noise[:20000])
    paths["empty.wav"].write_bytes(b"")
    flac, mp3 = RECORDINGS["one_window"].read_bytes(), RECORDINGS["cremad_mp3"].read_bytes()
    paths["truncated.flac"].write_bytes(flac[:5000])
    # headers intact, the coded audio after them replaced by noise
    paths["garbled.flac"].write_bytes(flac[:200] + noise[:len(flac) - 200])
    paths["garbled.mp3"].write_bytes(mp3[:2000] + noise[:len(mp3) - 2000])
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "3", str(paths["silent.wav"]))
    return paths


@pytest.mark.parametrize("name, expected", [
    ("video_only.mp4", "has no audio stream"),
    ("random.wav", r"not a media file ffmpeg can read \(.+\)"),
    ("empty.wav", r"not a media file ffmpeg can read \(.+\)"),
    ("truncated.flac", r"not a media file ffmpeg can read|audio cannot be decoded|no audio could be decoded"),
    ("garbled.flac", r"no audio could be decoded|audio cannot be decoded"),
    ("garbled.mp3", r"audio cannot be decoded \(.+\)|no audio could be decoded"),
    ("silent.wav", "the audio is silent"),
])
@needs_media
def test_unusable_recording_is_one_line(name, expected, bad_media, models, tmp_path) -> None:
    """Which of ffprobe or ffmpeg gives up on a corrupt file depends on ffmpeg's version:
    any of the three corrupt-file messages will do there, but one line it must be."""
    result = predict_cli(bad_media[name], tmp_path / "face.png", *model_args(models))
    line = assert_one_line_error(result, f"Error: {bad_media[name]}: ")
    assert re.search(expected, line), line
    assert line.count(str(bad_media[name])) == 1            # ffmpeg's own copy of the name is dropped
    assert not (tmp_path / "face.png").exists()


@needs_media
@pytest.mark.skipif(not NO_AUDIO_SAMPLE.is_file(), reason="sample corpus absent")
def test_sample_corpus_video_without_audio(models, tmp_path) -> None:
    result = predict_cli(NO_AUDIO_SAMPLE, tmp_path / "face.png", *model_args(models))
    assert_one_line_error(result, f"{NO_AUDIO_SAMPLE}: has no audio stream")


@needs_media
def test_missing_voice_and_missing_default_models(models, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)                               # no models/ here
    assert_one_line_error(predict_cli(tmp_path / "nope.wav", tmp_path / "face.png"), "nope.wav: no such file")
    voice = RECORDINGS["looped"]
    assert_one_line_error(predict_cli(voice, tmp_path / "face.png"),
                          "voice encoder models/voice_encoder.pt (and voice_encoder.json) not found")
    assert_one_line_error(predict_cli(voice, tmp_path / "face.png", "--encoder", str(models.encoder_path)),
                          "face decoder models/face_decoder.pt (and face_decoder.json) not found")
    assert not (tmp_path / "face.png").exists()


def broken_copy(source: Path, folder: Path, weights: bytes | None = None, meta: dict | list | None = None) -> Path:
    """Copy of a model's .pt/.json pair with the weights or the .json replaced."""
    folder.mkdir(exist_ok=True)
    target = folder / source.name
    target.write_bytes(source.read_bytes() if weights is None else weights)
    meta_text = source.with_suffix(".json").read_text() if meta is None else json.dumps(meta)
    target.with_suffix(".json").write_text(meta_text)
    return target


@needs_media
def test_broken_model_files_are_one_line(models, tmp_path) -> None:
    voice, output = RECORDINGS["looped"], tmp_path / "face.png"
    noise = np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    encoder_meta = json.loads(models.encoder_path.with_suffix(".json").read_text())

    def run(encoder: Path, decoder: Path):
        return predict_cli(voice, output, "--encoder", str(encoder), "--decoder", str(decoder))

    bad = broken_copy(models.encoder_path, tmp_path / "e1", weights=noise)
    assert_one_line_error(run(bad, models.decoder_path), f"voice encoder {bad} is not a readable state dict")
    bad = broken_copy(models.encoder_path, tmp_path / "e2", meta={"out_dim": FEATURE_DIM})
    assert_one_line_error(run(bad, models.decoder_path),
                          f"voice encoder settings {bad.with_suffix('.json')} are unusable", "width = None")
    # sizes a hostile JSON asks for are refused before anything is allocated
    started = time.perf_counter()
    bad = broken_copy(models.encoder_path, tmp_path / "e5", meta={**encoder_meta, "width": 1e9})
    assert_one_line_error(run(bad, models.decoder_path), "width = 1000000000.0: expected a number from 0.001 to 2")
    decoder_meta = json.loads(models.decoder_path.with_suffix(".json").read_text())
    bad = broken_copy(models.decoder_path, tmp_path / "d5", meta={**decoder_meta, "in_dim": 10**12})
    assert_one_line_error(run(models.encoder_path, bad), "in_dim = 1000000000000: expected a number from 1 to 8192")
    bad = broken_copy(models.encoder_path, tmp_path / "e6", meta=[1, 2])
    assert_one_line_error(run(bad, models.decoder_path), "expected a JSON object")
    assert time.perf_counter() - started < 30
    bad = broken_copy(models.encoder_path, tmp_path / "e3",
                      meta={**encoder_meta, "spectrogram": {**SETTINGS.as_dict(), "window": 4000}})
    assert_one_line_error(run(bad, models.decoder_path), f"{bad.with_suffix('.json')}: spectrogram.n_fft")
    bad = broken_copy(models.encoder_path, tmp_path / "e4",
                      meta={**encoder_meta, "spectrogram": {**SETTINGS.as_dict(), "n_fft": 1024}})
    assert_one_line_error(run(bad, models.decoder_path), "expects 257 frequencies", "give 513")
    bad = broken_copy(models.decoder_path, tmp_path / "d1", weights=noise)
    assert_one_line_error(run(models.encoder_path, bad), f"face decoder {bad}")
    other = tmp_path / "d2" / "face_decoder.pt"
    save_decoder(FaceDecoder(in_dim=64, width=WIDTH), other)
    assert_one_line_error(run(models.encoder_path, other), "128-D features", "64-D ones")
    assert not output.exists()


@needs_media
def test_model_locations_other_than_paths_runs_and_models_are_refused(models, tmp_path) -> None:
    voice, output = RECORDINGS["looped"], tmp_path / "face.png"
    for location in ("http://127.0.0.1:9/voice_encoder.pt", "s3://bucket/voice_encoder.pt",
                     "file:///etc/passwd", "mlflow-artifacts:/x/voice_encoder.pt"):
        result = predict_cli(voice, output, "--encoder", location, "--decoder", str(models.decoder_path))
        assert_one_line_error(result, location, "expected a path, runs:/<run id>/... or models:/<name>/...")
    assert not output.exists()


@needs_media
def test_unwritable_output_is_one_line(models, tmp_path) -> None:
    (tmp_path / "a_file").write_text("")
    result = predict_cli(RECORDINGS["looped"], tmp_path / "a_file" / "face.png", *model_args(models))
    assert_one_line_error(result, "cannot write", "is not a folder")


# --- the installed console script and MLflow (run last: their processes run in the background)


# Background processes run on one thread each: two cores, several processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def console_script(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: `pip install -e .` installs it"
    return subprocess.Popen([str(CONSOLE_SCRIPT), *args], cwd=cwd, env={**os.environ, **ONE_THREAD, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def mlflow_runs(models) -> dict:
    """Run ids of the two runs ``models`` logged: the encoder's files and the decoder's files
    as artifacts (``model/``) in a temporary SQLite store."""
    # imported here, not first inside a CliRunner: its log handler would keep that runner's stream
    pytest.importorskip("mlflow")
    store = finish(models.mlflow_job)
    assert store.returncode == 0, store.stderr
    folder = Path(models.mlflow_uri[len("sqlite:///"):]).parent
    return {"env": {"MLFLOW_TRACKING_URI": models.mlflow_uri}, "folder": folder,
            **json.loads(store.stdout.splitlines()[-1])}


@pytest.fixture(scope="module")
def console_runs(models, mlflow_runs) -> dict[str, subprocess.CompletedProcess]:
    """The installed script, three runs at once (each spends seconds starting torch)."""
    voice = str(RECORDINGS["looped"])
    started = {
        # no --encoder/--decoder: models/voice_encoder.pt and models/face_decoder.pt of the cwd
        "defaults": console_script("predict", voice, "-o", "out-defaults/face.png", cwd=models.folder),
        "missing_voice": console_script("predict", "no-such-recording.wav", cwd=models.folder),
        # a real process: MLflow's progress bars and log lines would show on its stderr
        "mlflow": console_script("predict", voice, "-o", "out-mlflow/face.png",
                                 "--encoder", f"runs:/{mlflow_runs['encoder']}/model",
                                 "--decoder", f"runs:/{mlflow_runs['decoder']}/model",
                                 env=mlflow_runs["env"], cwd=models.folder),
    }
    return {name: finish(process) for name, process in started.items()}


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@needs_media
def test_console_script_uses_the_default_model_paths(models, console_runs, direct) -> None:
    run = console_runs["defaults"]
    assert run.returncode == 0 and run.stderr == "", run.stderr
    voice = RECORDINGS["looped"]
    assert run.stdout == f"speech2face: {voice} ({flac_seconds(voice):.1f} s, 1 window) -> out-defaults/face.png\n"
    written = models.folder / "out-defaults" / "face.png"
    assert np.array_equal(read_png(written), direct("looped").image)
    assert written.stat().st_mode & 0o777 == 0o666 & ~current_umask()   # not mkstemp's 0600
    assert [p.name for p in written.parent.iterdir()] == ["face.png"]   # no temporary left


@needs_media
def test_console_script_error_is_one_line(console_runs, models) -> None:
    run = console_runs["missing_voice"]
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == "Error: no-such-recording.wav: no such file\n"
    assert not (models.folder / "face.png").exists()


@needs_media
def test_mlflow_run_uris_give_the_same_face_as_the_paths(models, console_runs) -> None:
    run = console_runs["mlflow"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""                       # no MLflow progress bar or log lines
    assert run.stdout.endswith("1 window) -> out-mlflow/face.png\n")
    # the same recording through the model paths (the defaults run)
    by_path = read_png(models.folder / "out-defaults" / "face.png")
    assert np.array_equal(read_png(models.folder / "out-mlflow" / "face.png"), by_path)


@needs_media
def test_mlflow_uri_of_the_pt_file_fetches_its_json_too(models, mlflow_runs, direct, tmp_path) -> None:
    result = predict_cli(RECORDINGS["looped"], tmp_path / "face.png",
                         "--encoder", f"runs:/{mlflow_runs['encoder']}/model/voice_encoder.pt",
                         "--decoder", f"runs:/{mlflow_runs['decoder']}/model/face_decoder.pt", env=mlflow_runs["env"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / "face.png"), direct("looped").image)


@needs_media
def test_registered_model_from_the_project_store(models, mlflow_runs, direct, monkeypatch, tmp_path) -> None:
    """No MLFLOW_TRACKING_URI: the store is <project>/mlflow.db, the project being the cwd or,
    inside a `dvc exp run --temp` copy (<project>/.dvc/tmp/exps/...), the folder above it;
    the model registry must be looked up there too, not in MLflow's default store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    experiment_copy = mlflow_runs["folder"] / ".dvc" / "tmp" / "exps" / "copy"
    experiment_copy.mkdir(parents=True)
    monkeypatch.chdir(experiment_copy)
    result = predict_cli(RECORDINGS["looped"], tmp_path / "face.png", "--encoder", "models:/cli-encoder/1",
                         "--decoder", str(models.decoder_path))
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / "face.png"), direct("looped").image)


@needs_media
def test_unknown_mlflow_run_is_one_line(models, mlflow_runs, tmp_path) -> None:
    unknown = "0123456789abcdef0123456789abcdef"
    result = predict_cli(RECORDINGS["looped"], tmp_path / "face.png", "--encoder", f"runs:/{unknown}/model",
                         "--decoder", str(models.decoder_path), env=mlflow_runs["env"])
    assert_one_line_error(result, f"cannot fetch runs:/{unknown}/model from MLflow: ", "not found")
    result = predict_cli(RECORDINGS["looped"], tmp_path / "face.png", "--encoder", str(models.encoder_path),
                         "--decoder", f"runs:/{mlflow_runs['decoder']}/no-such-folder", env=mlflow_runs["env"])
    assert_one_line_error(result, f"runs:/{mlflow_runs['decoder']}/no-such-folder")
    assert not (tmp_path / "face.png").exists()


@needs_media
def test_missing_mlflow_store_is_one_line_and_creates_nothing(models, tmp_path) -> None:
    store = tmp_path / "absent" / "mlflow.db"
    result = predict_cli(RECORDINGS["looped"], tmp_path / "face.png", "--encoder", "runs:/abc/model",
                         env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert_one_line_error(result, "runs:/abc/model", f"no MLflow store at {store}")
    assert not store.parent.exists()


PEAK_MEMORY = """
import sys
from pathlib import Path
from speech2face.cli import spectrogram_settings
from speech2face.models.encoder_io import load_encoder
from speech2face.models.face_decoder import load_decoder
from speech2face.voice_to_face import predict_face
encoder_path = Path(sys.argv[1])
prediction = predict_face(sys.argv[3], load_encoder(encoder_path), load_decoder(sys.argv[2]),
                          spectrogram_settings(encoder_path), max_seconds=float(sys.argv[4]))
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's, pytest's)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(prediction.seconds, peak_kb)
"""


@needs_media
def test_a_long_recording_takes_bounded_memory(models, tmp_path) -> None:
    """predict decodes only the first max_seconds: its peak memory does not grow with the
    recording (20 min and 1 h alike); decoding the whole hour (the old behaviour) does."""
    def generated(name: str, seconds: int) -> Path:
        path = tmp_path / name
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
                        f"sine=frequency=220:sample_rate=16000:duration={seconds}", "-af", "volume=0.5", str(path)],
                       check=True)
        return path

    def peak_mb(voice: Path, max_seconds: float) -> tuple[float, float]:
        done = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(models.encoder_path), str(models.decoder_path),
                               str(voice), str(max_seconds)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        seconds, kilobytes = done.stdout.split()
        return float(seconds), int(kilobytes) / 1024

    hour, twenty = generated("hour.flac", 3600), generated("twenty.flac", 1200)
    _, short_peak = peak_mb(RECORDINGS["looped"], 600)
    (twenty_seconds, twenty_peak), (hour_seconds, hour_peak) = peak_mb(twenty, 600), peak_mb(hour, 600)
    whole_seconds, whole_peak = peak_mb(hour, 3600)
    print(f"peak RSS: 6 s recording {short_peak:.0f} MB; capped at 600 s: 20 min {twenty_peak:.0f} MB, "
          f"1 h {hour_peak:.0f} MB; the whole hour {whole_peak:.0f} MB")
    assert (twenty_seconds, hour_seconds, whole_seconds) == (600.0, 600.0, 3600.0)
    assert abs(hour_peak - twenty_peak) < 40                 # bounded: the length of the file does not count
    assert hour_peak - short_peak < 200                      # 600 s of 16 kHz audio and its copies
    assert whole_peak - hour_peak > 150                      # what the limit saves on an hour
