"""Speech2Face's input spectrogram: looped audio -> STFT -> power-law compression of re/im.

The framing matches ``tf.signal.stft(frame_length=400, frame_step=160, fft_length=512)``,
which is what the paper used: frames of ``window`` samples every ``hop`` samples, no centre
padding, each frame multiplied by a periodic Hann window and zero-padded AT ITS END to
``n_fft`` before the real FFT. 6 s at 16 kHz gives (96000 - 400) // 160 + 1 = 598 frames of
257 frequencies. ``torch.stft``/``librosa.stft`` frame differently when the window is shorter
than ``n_fft`` (they centre the window inside an ``n_fft``-long frame: 597 frames with
``center=False`` and a phase ramp on re/im), so frames are cut here with ``unfold`` and
transformed with ``torch.fft.rfft(n=n_fft)``.

Compression is applied to the real and imaginary parts separately, ``sgn(x) |x|^power``,
not to magnitude and phase.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from speech2face.core.params import ParamsError

# On-disk dtypes of the spectrogram shards. float16 halves the disk and page-cache
# footprint; compressed values lie within a few units, far inside its range.
STORAGE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class SpectrogramSettings:
    seconds: float = 6.0
    sample_rate: int = 16000
    window: int = 400
    hop: int = 160
    n_fft: int = 512
    power: float = 0.3

    @property
    def n_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        return frame_count(self.n_samples, self.window, self.hop)

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one clip's spectrogram: (frames, frequencies, re/im)."""
        return (self.n_frames, self.n_freqs, 2)

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "SpectrogramSettings":
        """Raise ParamsError (one line) for settings that cannot give a spectrogram."""
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ParamsError(f"params.yaml: spectrogram.{key} = {getattr(self, key)!r}: expected {expected}")

        need(self.sample_rate >= 1000, "sample_rate", "an integer >= 1000")
        need(self.window >= 2, "window", "an integer >= 2")
        need(self.hop >= 1, "hop", "an integer >= 1")
        need(self.n_fft >= self.window, "n_fft", f"an integer >= window ({self.window})")
        need(self.power > 0, "power", "a number > 0")
        need(self.n_samples >= self.window, "seconds",
             f"at least one window long ({self.window / self.sample_rate:g} s)")
        return self


def frame_count(n_samples: int, window: int, hop: int) -> int:
    """Frames of ``window`` samples at ``hop`` that fit in ``n_samples`` (no padding)."""
    return 0 if n_samples < window else (n_samples - window) // hop + 1


def loop_to_length(audio: np.ndarray, n: int) -> np.ndarray:
    """``audio`` repeated until it has at least ``n`` samples, then cut to exactly ``n``.

    Sample k of the result is ``audio[k % len(audio)]``; longer audio keeps its first n.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"loop_to_length: expected mono audio (1-D), got shape {audio.shape}")
    if n < 0:
        raise ValueError(f"loop_to_length: length must be >= 0, got {n}")
    if len(audio) == 0:
        raise ValueError("loop_to_length: empty audio cannot be repeated to any length")
    if len(audio) >= n:
        return audio[:n]
    return np.tile(audio, math.ceil(n / len(audio)))[:n]


def stft_frames(signals: torch.Tensor, window: int, hop: int, n_fft: int) -> torch.Tensor:
    """Complex STFT (batch, frames, n_fft // 2 + 1) with tf.signal.stft framing.

    ``signals``: (batch, samples) real tensor, on any device.
    """
    if signals.ndim != 2:
        raise ValueError(f"stft_frames: expected (batch, samples), got shape {tuple(signals.shape)}")
    if signals.shape[-1] < window:
        raise ValueError(f"stft_frames: {signals.shape[-1]} samples is shorter than one window ({window})")
    hann = torch.hann_window(window, periodic=True, dtype=signals.dtype, device=signals.device)
    frames = signals.unfold(-1, window, hop) * hann  # (batch, frames, window)
    return torch.fft.rfft(frames, n=n_fft, dim=-1)  # n > window: zeros appended at each frame's end


def compress(spectrum: torch.Tensor, power: float) -> torch.Tensor:
    """``sgn(x) |x|^power`` on the real and imaginary parts separately -> (..., 2) real."""
    parts = torch.view_as_real(spectrum)
    if parts.requires_grad:
        return torch.sign(parts) * parts.abs().pow(power)
    # exp(power * log|x|) in place: twice as fast as pow() on CPU (no temporaries), same
    # float32 accuracy; log 0 = -inf gives exactly 0.
    return parts.abs().log_().mul_(power).exp_().copysign_(parts)


def compressed_stft(signals: torch.Tensor, settings: SpectrogramSettings) -> torch.Tensor:
    """(batch, samples) -> (batch, frames, frequencies, 2) compressed re/im."""
    return compress(stft_frames(signals, settings.window, settings.hop, settings.n_fft), settings.power)


# Clips per FFT call on CPU: bigger chunks spill the caches and fault in fresh buffers,
# 64 clips at once runs at half the speed of 8. Accelerators take a whole batch at once.
CPU_CHUNK = 8


def spectrogram_batch(audios: Sequence[np.ndarray], settings: SpectrogramSettings,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """Float audio clips of any lengths -> float32 (batch, frames, frequencies, 2).

    Each clip is looped/cut to ``settings.seconds`` first, so all share one shape.
    """
    out = np.empty((len(audios), *settings.shape), dtype=np.float32)
    chunk = CPU_CHUNK if torch.device(device).type == "cpu" else max(len(audios), 1)
    n = settings.n_samples
    with torch.no_grad():
        for start in range(0, len(audios), chunk):
            looped = np.stack([loop_to_length(np.asarray(a, dtype=np.float32), n)
                               for a in audios[start:start + chunk]])
            result = compressed_stft(torch.from_numpy(looped).to(device), settings)
            out[start:start + len(looped)] = result.cpu().numpy()
    return out


def spectrogram(audio: np.ndarray, settings: SpectrogramSettings) -> np.ndarray:
    """One clip -> float32 (frames, frequencies, 2)."""
    return spectrogram_batch([audio], settings)[0]
