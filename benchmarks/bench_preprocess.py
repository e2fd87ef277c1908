"""Preprocessing throughput: extract + spectrogram + faces, clips/s, pipeline vs a naive loop.

    .venv/bin/python benchmarks/bench_preprocess.py [--workers 1 2] [--limit N] [--naive-limit N] [--from-sample]

Network excluded. The clips are the download stage's output (data/clips, listed in
data/manifests/download.csv), the first ``limit`` usable ones. Where that output is absent
(a clean clone) or with ``--from-sample``, the download code cuts the first ``limit``
segments of the embedded sample corpus (data/sample, file:// URLs) into a temp folder:
data/clips itself is never written here.

The pipeline: each worker count runs the three stages (speech2face.data.extract.run_extract,
.spectrogram.run_spectrogram, .faces.run_faces) from scratch into a temp folder with the
params.yaml settings, process pools and model loading included.

The baseline (``naive``), measured in the same run, is how the public re-implementations
preprocess, one clip at a time in one process: ffprobe for the duration, one ffmpeg
process for the audio (a WAV file read back) and one ffmpeg process per frame (a JPEG
read back; the same ``frames_per_clip`` frames at the same times as the pipeline), one
``librosa.stft`` per clip, and ``face_recognition.face_locations`` +
``face_recognition.face_encodings`` on every frame. The pipeline instead decodes a clip in
one ffmpeg process, batches the STFTs in torch, and detects/embeds faces from the middle
frame outwards until one is found (faces.embed_frames: middle), in worker processes.
Ratios are against the naive figure of the same step. The split into steps is not quite
like for like: the naive spectrogram step is the STFT alone (its audio is in memory from
its extract step), while the pipeline's spectrogram stage also reads the extract shards
and writes its own; the totals compare the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402  (puts src/ on the path)
from benchlib import ROOT  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from speech2face.core.params import load_config, load_section  # noqa: E402
from speech2face.data.extract import ExtractConfig, run_extract  # noqa: E402
from speech2face.data.faces import FacesConfig, run_faces  # noqa: E402
from speech2face.data.spectrogram import SpectrogramConfig, run_spectrogram  # noqa: E402
from speech2face.core.tables import OK, read_table, write_table  # noqa: E402

STEPS = ("extract", "spectrogram", "faces")


# ------------------------------------------------------------------------- the clips

def clip_source(limit: int | None, work: Path, from_sample: bool = False) -> tuple[Path, Path, str]:
    """(manifest of the first ``limit`` usable clips, folder holding the clips, origin)."""
    manifest = ROOT / "data/manifests/download.csv"
    clips_dir = ROOT / "data/clips"
    if not from_sample and manifest.exists() and clips_dir.is_dir():
        table = read_table(manifest)
        table = table[table["status"] == OK]
        table = table[[(clips_dir / Path(p).name).exists() for p in table["path"]]]
        origin = "data/clips (download stage output)"
    else:
        from speech2face.data.download import DownloadConfig, download_stage

        p = load_config(DownloadConfig, ROOT / "params.yaml")
        built = work / "download-all.csv"
        clips_dir = work / "clips"
        # limit on CSV rows: a few extra rows cover segments the download refuses
        p = dataclasses.replace(p, csv=str(ROOT / p.csv), limit=None if limit is None else limit + 3)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            download_stage(p, clips_dir, built, ROOT)
        table = read_table(built)
        table = table[table["status"] == OK]
        origin = "cut from data/sample by the download code (data/clips absent or --from-sample)"
    if limit:
        table = table.head(limit)
    if table.empty:
        raise RuntimeError("no usable clips for the preprocessing benchmark")
    subset = work / "download.csv"
    write_table(table.reset_index(drop=True), subset)
    return subset, clips_dir, origin


# -------------------------------------------------------------------- the pipeline

def run_pipeline(manifest: Path, clips_dir: Path, workers: int, out: Path) -> dict[str, float]:
    """Seconds per step of the three stages with ``workers`` workers (params.yaml otherwise)."""
    params = ROOT / "params.yaml"
    e, s, f = (dataclasses.replace(load_config(cls, params), workers=workers)
               for cls in (ExtractConfig, SpectrogramConfig, FacesConfig))
    timings = {}
    started = time.perf_counter()
    run_extract(manifest, clips_dir, out / "extracted", e)
    timings["extract"] = time.perf_counter() - started
    started = time.perf_counter()
    run_spectrogram(out / "extracted", out / "spectrograms", s)
    timings["spectrogram"] = time.perf_counter() - started
    started = time.perf_counter()
    run_faces(out / "extracted", out / "faces", f)
    timings["faces"] = time.perf_counter() - started
    index = read_table(out / "faces" / "index.csv")
    timings["faces_found"] = int((index["status"] == OK).sum())
    return timings


# ------------------------------------------------------------- the naive baseline

def _run(command: list[str]) -> bytes:
    return subprocess.run(command, check=True, capture_output=True).stdout


def naive_extract(clip: Path, frames_per_clip: int, sample_rate: int, tmp: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """One ffprobe, one ffmpeg for the audio (WAV file), one ffmpeg per frame (JPEG file)."""
    from PIL import Image
    from scipy.io import wavfile

    duration = float(_run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                           "stream=duration", "-of", "csv=p=0", str(clip)]).strip() or 0)
    if duration <= 0:
        duration = float(_run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                               str(clip)]).strip())
    wav = tmp / "audio.wav"
    _run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(clip), "-vn", "-ac", "1", "-ar", str(sample_rate),
          str(wav)])
    _, audio = wavfile.read(wav)
    frames = []
    for k in range(frames_per_clip):
        at = (k + 0.5) * duration / frames_per_clip
        jpeg = tmp / f"frame{k}.jpg"
        _run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", f"{at:.3f}", "-i", str(clip), "-frames:v", "1",
              "-q:v", "2", str(jpeg)])
        frames.append(np.asarray(Image.open(jpeg).convert("RGB")))
    return audio, frames


def run_naive(manifest: Path, clips_dir: Path, tmp: Path, limit: int | None = None) -> dict[str, float]:
    """Seconds per step of the naive per-clip loop over the manifest's first ``limit`` clips
    (all: None). Its cost per clip has no start-up part (imports and model loading are
    warmed up before the clock), so a subset measures its rate as well as all clips do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
        import face_recognition

    from bench_spectrogram import librosa_one
    from speech2face.data.audio import SpectrogramSettings, loop_to_length

    e, s = load_section("extract", ROOT / "params.yaml"), load_section("spectrogram", ROOT / "params.yaml")
    settings = SpectrogramSettings(s["seconds"], s["sample_rate"], s["window"], s["hop"], s["n_fft"], s["power"])
    timings = {step: 0.0 for step in STEPS}
    found = 0
    tmp.mkdir(parents=True, exist_ok=True)
    # warm-up outside the timing: imports, first-call set-up of librosa and dlib
    librosa_one(np.zeros(settings.n_samples, np.float32), settings)
    face_recognition.face_locations(np.zeros((64, 64, 3), np.uint8))
    paths = read_table(manifest)["path"]
    for path in (paths.head(limit) if limit else paths):
        started = time.perf_counter()
        try:
            audio, frames = naive_extract(clips_dir / Path(path).name, e["frames_per_clip"], e["sample_rate"], tmp)
        except subprocess.CalledProcessError:   # e.g. the sample's clip without audio: skipped, as the stage does
            timings["extract"] += time.perf_counter() - started
            continue
        timings["extract"] += time.perf_counter() - started
        started = time.perf_counter()
        librosa_one(loop_to_length(audio.astype(np.float32) / 32768.0, settings.n_samples), settings)
        timings["spectrogram"] += time.perf_counter() - started
        started = time.perf_counter()
        encodings = []
        for frame in frames:
            locations = face_recognition.face_locations(frame)
            encodings += face_recognition.face_encodings(frame, locations)
        found += bool(encodings)
        timings["faces"] += time.perf_counter() - started
    timings["faces_found"] = found
    return timings


# ---------------------------------------------------------------------- the whole

def measure(limit: int | None = None, workers: list[int] | None = None, from_sample: bool = False,
            quiet: bool = True, naive_limit: int | None = 32) -> dict:
    """Naive baseline and pipeline (per worker count): clips/s per step and end to end.

    The pipeline runs on the first ``limit`` usable clips (None: all), start-up of its worker
    processes and model loading included (about 4 s a stage with 2 workers, so a few dozen
    clips understate its rate); the naive loop on the first ``naive_limit`` of them."""
    workers = workers or benchlib.worker_counts(benchlib.usable_cores())
    workers = sorted(set(workers))
    result: dict = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="s2f-bench-pre-") as tmp:
        tmp = Path(tmp)
        manifest, clips_dir, origin = clip_source(limit, tmp, from_sample)
        n = len(read_table(manifest))
        result.update({"clips": n, "clip_source": origin,
                       "frames_per_clip": load_section("extract", ROOT / "params.yaml")["frames_per_clip"]})
        naive_n = min(n, naive_limit) if naive_limit else n
        result["naive_clips"] = naive_n
        runs = [("naive", lambda: run_naive(manifest, clips_dir, tmp / "naive", naive_n))]
        runs += [(f"pipeline, {w} worker{'s' if w > 1 else ''}",
                  (lambda w=w: run_pipeline(manifest, clips_dir, w, tmp / f"w{w}"))) for w in workers]
        for name, fn in runs:
            with _silenced() if quiet else contextlib.nullcontext():  # the stages' progress bars
                seconds = fn()
            found = seconds.pop("faces_found")
            seconds["total"] = sum(seconds[s] for s in STEPS)
            clips = naive_n if name == "naive" else n
            result["runs"][name] = {"seconds": seconds, "clips_per_second": {k: clips / v for k, v in seconds.items()},
                                    "clips_with_face": found}
    result["baseline"] = "naive"
    return result


@contextlib.contextmanager
def _silenced():
    """Stages print progress bars and summaries; in a benchmark run they are noise."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... cores")
    parser.add_argument("--limit", type=int, default=0, help="first N usable clips (0 = all)")
    parser.add_argument("--naive-limit", type=int, default=32, help="the naive loop on the first N of them (0 = all)")
    parser.add_argument("--from-sample", action="store_true", help="cut the clips from data/sample")
    args = parser.parse_args()
    result = measure(args.limit or None, args.workers, args.from_sample, naive_limit=args.naive_limit or None)
    table = pd.DataFrame({name: run["clips_per_second"] for name, run in result["runs"].items()}).T
    print(f"\nmachine: {benchlib.cpu_model()}, {os.cpu_count()} cores; {result['clips']} clips, naive on "
          f"{result['naive_clips']} ({result['clip_source']}); clips/s per step (total = all three steps in sequence)")
    print(table.round(2).to_string())
    base = table.loc["naive"]
    for name, row in table.iterrows():
        print(f"{name}: {row['total']:.2f} clips/s end to end, {row['total'] / base['total']:.2f}x naive; "
              + ", ".join(f"{s} {row[s] / base[s]:.2f}x" for s in STEPS))


if __name__ == "__main__":
    main()
