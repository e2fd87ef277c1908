"""Spectrogram throughput: batched torch (audio.spectrogram_batch) vs librosa one clip at a time.

    .venv/bin/python benchmarks/bench_spectrogram.py [--clips 128] [--batch 32] [--threads 2]

``measure()`` is what benchmarks/run_all.py calls. Both sides compute a 6 s clip's STFT
(400/160/512) and compress re/im with |x|^0.3; librosa frames differently (597 frames,
see audio.py), which does not change its cost. Ratios are against the librosa figure
measured in the same run. torch's threads slow down badly when other processes hold the
cores (the figures swing with the machine's load; run_all.py records it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import librosa  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from speech2face.data.audio import SpectrogramSettings, spectrogram_batch  # noqa: E402


def librosa_one(audio: np.ndarray, s: SpectrogramSettings) -> np.ndarray:
    spectrum = librosa.stft(audio, n_fft=s.n_fft, win_length=s.window, hop_length=s.hop, center=False).T
    parts = np.stack([spectrum.real, spectrum.imag], axis=-1)
    return np.sign(parts) * np.abs(parts) ** s.power


def clips_per_second(fn, clips: list[np.ndarray], repeats: int) -> float:
    fn(clips[:2])  # warm-up: allocator, FFT plans
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(clips)
        best = min(best, time.perf_counter() - start)
    return len(clips) / best


def measure(n_clips: int = 128, batch: int = 32, threads: int = 2, repeats: int = 3, seed: int = 0) -> dict:
    """clips/s of librosa one clip at a time (the baseline), torch one at a time, torch batched.

    Returns {"settings": ..., "rates": {name: clips/s}, "baseline": name}.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = SpectrogramSettings()
        rng = np.random.default_rng(seed)
        clips = [(0.1 * rng.standard_normal(s.n_samples)).astype(np.float32) for _ in range(n_clips)]

        def librosa_loop(clips_):
            return [librosa_one(a, s) for a in clips_]

        def torch_one_at_a_time(clips_):
            return [spectrogram_batch([a], s) for a in clips_]

        def torch_batched(clips_):
            return [spectrogram_batch(clips_[i:i + batch], s) for i in range(0, len(clips_), batch)]

        rates = {"librosa, one clip at a time": clips_per_second(librosa_loop, clips, repeats),
                 "torch, one clip at a time": clips_per_second(torch_one_at_a_time, clips, repeats),
                 f"torch, batches of {batch}": clips_per_second(torch_batched, clips, repeats)}
    finally:
        torch.set_num_threads(threads_before)
    return {"settings": {"clips": n_clips, "seconds": s.seconds, "batch": batch, "torch_threads": threads,
                         "repeats": repeats, "librosa": librosa.__version__},
            "rates": rates, "baseline": "librosa, one clip at a time"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.clips, args.batch, args.threads, args.repeats)
    baseline = result["rates"][result["baseline"]]
    print(f"{args.clips} clips of {result['settings']['seconds']:g} s, torch threads {args.threads}, "
          f"torch {torch.__version__}, librosa {librosa.__version__}")
    for name, rate in result["rates"].items():
        print(f"{name:<29}: {rate:8.1f} clips/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
