"""Spectrogram library: tf.signal.stft framing, re/im compression, looping, on synthetic and real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.data.audio import (SpectrogramSettings, compress, frame_count, loop_to_length,
                               spectrogram, spectrogram_batch, stft_frames)
from speech2face.core.params import ParamsError

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"
LIBRISPEECH = MEDIA / "speech" / "librispeech"
needs_librispeech = pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"real media folder {LIBRISPEECH} absent")

SR = 16000
PAPER = SpectrogramSettings(seconds=6.0, sample_rate=SR, window=400, hop=160, n_fft=512, power=0.3)


def white_noise(seconds: float, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(int(round(seconds * SR)))).astype(np.float32)


def sine(freq: float, seconds: float = 6.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def reference_stft(x: np.ndarray, window: int = 400, hop: int = 160, n_fft: int = 512) -> np.ndarray:
    """Independent float64 computation of tf.signal.stft: frames cut by hand, periodic Hann
    by its formula, each frame zero-padded at its end to n_fft."""
    x = np.asarray(x, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    n_frames = (len(x) - window) // hop + 1
    frames = np.zeros((n_frames, n_fft))
    for t in range(n_frames):
        frames[t, :window] = x[t * hop:t * hop + window] * hann
    return np.fft.rfft(frames, axis=1)


def reference_compressed(x: np.ndarray, power: float = 0.3) -> np.ndarray:
    spectrum = reference_stft(x)
    def squash(v: np.ndarray) -> np.ndarray:
        return np.sign(v) * np.abs(v) ** power
    return np.stack([squash(spectrum.real), squash(spectrum.imag)], axis=-1)


def power_spectrum(compressed: np.ndarray, power: float = 0.3) -> np.ndarray:
    """Undo the compression -> |S|^2 per (frame, frequency)."""
    raw = np.abs(compressed.astype(np.float64)) ** (1 / power)
    return (raw ** 2).sum(axis=-1)


# --- shape and parity --------------------------------------------------------------------

def test_six_seconds_gives_the_papers_598_by_257_by_2() -> None:
    out = spectrogram(white_noise(6.0), PAPER)
    assert out.shape == (598, 257, 2) == PAPER.shape
    assert out.dtype == np.float32
    assert frame_count(96000, 400, 160) == 598 == (96000 - 400) // 160 + 1


def test_complex_stft_matches_independent_numpy_computation() -> None:
    x = white_noise(6.0, seed=1)
    ours = stft_frames(torch.from_numpy(x)[None], 400, 160, 512)[0].numpy()
    expected = reference_stft(x)
    assert ours.shape == expected.shape == (598, 257)
    # float32 FFT against float64: errors ~1e-7 of the spectrum's scale
    assert np.abs(ours - expected).max() < 2e-6 * np.abs(expected).max()


def assert_matches_reference(out: np.ndarray, x: np.ndarray) -> None:
    """float32 compressed output vs the float64 reference. FFT rounding is ~1e-7 of the
    spectrum's scale; |x|^0.3 magnifies it for entries near zero, so the compressed values
    are held to 1e-4 relative where the raw value exceeds 1e-3 of the scale, and all entries,
    decompressed, to 2e-6 of the scale."""
    raw = reference_stft(x)
    raw = np.stack([raw.real, raw.imag], axis=-1)
    scale = np.abs(raw).max()
    expected = reference_compressed(x)
    assert out.shape == expected.shape
    decompressed = np.sign(out) * np.abs(out.astype(np.float64)) ** (1 / 0.3)
    assert np.abs(decompressed - raw).max() < 2e-6 * scale
    big = np.abs(raw) > 1e-3 * scale
    assert big.mean() > 0.1  # speech: a quarter of the entries, noise: nearly all
    assert np.max(np.abs(out[big] - expected[big]) / np.abs(expected[big])) < 1e-4


def test_compressed_output_matches_independent_numpy_computation() -> None:
    for seed in (2, 3):
        x = white_noise(6.0, seed=seed)
        assert_matches_reference(spectrogram(x, PAPER), x)


def test_compression_acts_on_real_and_imaginary_parts_not_magnitude() -> None:
    spectrum = torch.tensor([complex(-8.0, 0.001), complex(0.0, 2.0), complex(3.0, -4.0)], dtype=torch.complex64)
    out = compress(spectrum, 0.3).numpy()
    expected = np.array([[-(8.0 ** 0.3), 0.001 ** 0.3], [0.0, 2.0 ** 0.3], [3.0 ** 0.3, -(4.0 ** 0.3)]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # magnitude compression would give |3-4j|^0.3 = 5^0.3 spread by the phase: not this
    assert not np.isclose(np.hypot(*out[2]), 5.0 ** 0.3, rtol=1e-3)


def test_compression_with_gradients_gives_the_same_values() -> None:
    spectrum = stft_frames(torch.from_numpy(white_noise(0.5, seed=9))[None], 400, 160, 512)
    fast = compress(spectrum, 0.3)  # in-place exp/log path
    traced = compress(spectrum.clone().requires_grad_(), 0.3)  # autograd-safe pow path
    np.testing.assert_allclose(fast.numpy(), traced.detach().numpy(), rtol=1e-5, atol=1e-6)
    traced.sum().backward()


def test_librosa_frames_differently_and_is_not_used() -> None:
    """librosa centres the 400-sample window inside a 512-sample frame: 597 frames with
    center=False (601 with center=True), each taken 56 samples later than tf.signal.stft's,
    which on re/im is a phase ramp. Documents why audio.py frames by hand."""
    librosa = pytest.importorskip("librosa")
    x = white_noise(6.0, seed=4)
    ours = stft_frames(torch.from_numpy(x)[None], 400, 160, 512)[0].numpy()
    theirs = librosa.stft(x, n_fft=512, win_length=400, hop_length=160, center=False).T
    assert ours.shape == (598, 257) and theirs.shape == (597, 257)
    assert librosa.stft(x, n_fft=512, win_length=400, hop_length=160, center=True).shape == (257, 601)
    # same frame index, different numbers
    assert np.abs(ours[:597] - theirs).max() > 0.5 * np.abs(ours).max()
    # ... because librosa's frame t is our frame of x[56:] times exp(-2 pi i k 56 / 512)
    offset = (512 - 400) // 2
    shifted = stft_frames(torch.from_numpy(x[offset:].copy())[None], 400, 160, 512)[0].numpy()[:597]
    ramp = np.exp(-2j * np.pi * np.arange(257) * offset / 512)
    np.testing.assert_allclose(theirs, shifted * ramp, atol=1e-4 * np.abs(theirs).max())


# --- looping -----------------------------------------------------------------------------

def test_loop_to_length_repeats_short_audio_and_cuts_long_audio() -> None:
    for seconds in (2.0, 2.5, 0.001):
        x = white_noise(seconds, seed=5)
        looped = loop_to_length(x, 96000)
        k = np.arange(96000)
        assert looped.shape == (96000,)
        np.testing.assert_array_equal(looped, x[k % len(x)])
    long = white_noise(7.0, seed=6)
    np.testing.assert_array_equal(loop_to_length(long, 96000), long[:96000])
    np.testing.assert_array_equal(loop_to_length(long, 0), long[:0])


def test_loop_to_length_rejects_empty_and_multichannel_audio() -> None:
    with pytest.raises(ValueError, match="empty audio"):
        loop_to_length(np.zeros(0, np.float32), 96000)
    with pytest.raises(ValueError, match="mono"):
        loop_to_length(np.zeros((2, 100), np.float32), 96000)


def test_short_clip_spectrogram_is_that_of_the_looped_clip() -> None:
    two_seconds = white_noise(2.0, seed=7)
    np.testing.assert_array_equal(spectrogram(two_seconds, PAPER), spectrogram(np.tile(two_seconds, 3), PAPER))
    seven_seconds = white_noise(7.0, seed=8)
    np.testing.assert_array_equal(spectrogram(seven_seconds, PAPER), spectrogram(seven_seconds[:96000], PAPER))
    # and looping is not zero-padding: the looped tail is as loud as the head
    power = power_spectrum(spectrogram(two_seconds, PAPER)).sum(axis=1)
    assert power[-100:].mean() > 0.8 * power[:100].mean()


# --- frequencies -------------------------------------------------------------------------

@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0, 7000.0])
def test_pure_sine_lands_in_its_frequency_bin(freq: float) -> None:
    power = power_spectrum(spectrogram(sine(freq), PAPER)).mean(axis=0)
    expected_bin = int(round(freq * 512 / SR))  # 31.25 Hz per bin
    assert int(np.argmax(power)) == expected_bin
    # a Hann main lobe: nearly all energy within two bins of the peak
    assert power[expected_bin - 2:expected_bin + 3].sum() > 0.99 * power.sum()


# --- real speech -------------------------------------------------------------------------

def _librispeech(names: list[str]) -> list[np.ndarray]:
    import soundfile

    clips = []
    for name in names:
        speaker = name.split("-")[0]
        audio, rate = soundfile.read(LIBRISPEECH / speaker / f"{name}.flac", dtype="float32")
        assert rate == SR and audio.ndim == 1
        clips.append(audio)
    return clips


@needs_librispeech
def test_real_speech_is_finite_and_concentrated_below_4_khz() -> None:
    # 2.8 s (looped), 6.0 s, 13.3 s (cut), two speakers
    clips = _librispeech(["1688-142285-0002", "1998-15444-0001", "1998-15444-0000"])
    batch = spectrogram_batch(clips, PAPER)
    assert batch.shape == (3, 598, 257, 2) and np.isfinite(batch).all()
    below_4khz = 4000 * 512 // SR  # bin 128
    for out in batch:
        power = power_spectrum(out)
        assert power[:, :below_4khz].sum() > 0.9 * power.sum()
    # white noise would put half its energy above 4 kHz: the check can fail
    noise_power = power_spectrum(spectrogram(white_noise(6.0), PAPER))
    assert noise_power[:, :below_4khz].sum() < 0.6 * noise_power.sum()

    one_at_a_time = np.stack([spectrogram(c, PAPER) for c in clips])
    np.testing.assert_allclose(batch, one_at_a_time, rtol=1e-6, atol=1e-6)
    for clip, out in zip(clips, batch):
        assert_matches_reference(out, loop_to_length(clip, 96000))


# --- settings ----------------------------------------------------------------------------

def test_settings_are_validated_with_one_line_errors() -> None:
    assert SpectrogramSettings(seconds=3.0).shape == (298, 257, 2)
    assert SpectrogramSettings(n_fft=1024).validate().shape == (598, 513, 2)
    with pytest.raises(ParamsError, match="n_fft"):
        SpectrogramSettings(n_fft=256).validate()
    with pytest.raises(ParamsError, match="seconds"):
        SpectrogramSettings(seconds=0.01).validate()
