"""Spectrogram throughput: batched torch (audio.spectrogram_batch) vs librosa one clip at a time.

    .venv/bin/python benchmarks/bench_spectrogram.py [--clips 128] [--batch 32] [--threads 2]

Both sides compute a 6 s clip's STFT (400/160/512) and compress re/im with |x|^0.3; librosa
frames differently (597 frames, see audio.py), which does not change its cost. Ratios are
against the librosa figure measured in the same run.
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

from speech2face.audio import SpectrogramSettings, spectrogram_batch  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = SpectrogramSettings()
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(s.n_samples)).astype(np.float32) for _ in range(args.clips)]

    def librosa_loop(batch):
        return [librosa_one(a, s) for a in batch]

    def torch_one_at_a_time(batch):
        return [spectrogram_batch([a], s) for a in batch]

    def torch_batched(batch):
        return [spectrogram_batch(batch[i:i + args.batch], s) for i in range(0, len(batch), args.batch)]

    baseline = clips_per_second(librosa_loop, clips, args.repeats)
    print(f"{args.clips} clips of {s.seconds:g} s, torch threads {args.threads}, "
          f"torch {torch.__version__}, librosa {librosa.__version__}")
    print(f"librosa, one clip at a time  : {baseline:8.1f} clips/s  (1.00x)")
    for name, fn in [("torch, one clip at a time", torch_one_at_a_time),
                     (f"torch, batches of {args.batch}", torch_batched)]:
        rate = clips_per_second(fn, clips, args.repeats)
        print(f"{name:<29}: {rate:8.1f} clips/s  ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
