"""GE2E speaker encoder (Wan et al. 2018) in torch, with the trained weights that ship in the
``resemblyzer`` wheel: a pretrained, offline speaker backbone.

Network: a 3-layer LSTM (40 -> 256) over 160 frames (1.6 s) of a 40-band mel spectrogram,
a linear layer 256 -> 256 on the last layer's final hidden state, ReLU, L2 normalisation:
one 256-D unit vector per partial utterance (``GE2EEncoder.forward``).

Front end (``mel_spectrogram``): 16 kHz audio, 25 ms Hann windows every 10 ms (400 / 160
samples, centred: 200 zeros padded at each end), power spectrum, 40 Slaney mel bands. No
log: the network was trained on power mel energies (resemblyzer's ``wav_to_mel_spectrogram``).

Utterance (``GE2EEncoder.embed_utterance``): the wav is cut into 160-frame partials, 1.3 per
second, the last one kept if it covers at least 75 % of its frames (zero-padded), the wav
padded up to the end of the last partial before the mel is computed; the utterance embedding
is the mean of the partial embeddings, L2-normalised again. Every number here is
resemblyzer 0.1.4's (hparams.py, voice_encoder.py), so embeddings equal its ``VoiceEncoder``.

Audio is expected preprocessed as resemblyzer's embeddings were trained: ``preprocess_wav``
(volume raised to -30 dBFS, silences longer than ~0.2 s cut by WebRTC's VAD).

Fine-tuning: ``GE2EEncoder`` is a plain ``nn.Module`` whose parameters are trainable as loaded;
``freeze()`` turns their gradients off to use it as a fixed feature extractor.

The weights are read from the installed wheel (``resemblyzer/pretrained.pt``), never from the
network: install with ``pip install --no-deps resemblyzer==0.1.4 webrtcvad-wheels==2.0.14.post1``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
MEL_WINDOW = 400            # samples: 25 ms
MEL_HOP = 160               # samples: 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160        # 1.6 s of mel frames per partial utterance
PARTIALS_PER_SECOND = 1.3   # resemblyzer's embed_utterance default rate
MIN_COVERAGE = 0.75         # share of its frames the last partial must have to be kept
HIDDEN_SIZE = 256
EMBEDDING_SIZE = 256
LSTM_LAYERS = 3

INSTALL_COMMAND = "pip install --no-deps resemblyzer==0.1.4 webrtcvad-wheels==2.0.14.post1"


# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, 200/3 Hz per mel;
# logarithmic above, 27 mels per factor 6.4.
_HZ_PER_MEL = 200.0 / 3
_LOG_STEP = np.log(6.4) / 27.0
_KNEE_HZ = 1000.0
_KNEE_MEL = _KNEE_HZ / _HZ_PER_MEL


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    # np.where computes both branches: the floor keeps log(0) out of the unused one
    above = _KNEE_MEL + np.log(np.maximum(hz, 1e-12) / _KNEE_HZ) / _LOG_STEP
    return np.where(hz >= _KNEE_HZ, above, hz / _HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _KNEE_MEL, _KNEE_HZ * np.exp(_LOG_STEP * (mel - _KNEE_MEL)), mel * _HZ_PER_MEL)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = MEL_WINDOW, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float64 triangular filters from 0 Hz to Nyquist, centres evenly
    spaced on Slaney's mel scale, each scaled to unit area ("slaney" norm): the filters of
    ``librosa.filters.mel`` with its defaults, which resemblyzer's mel spectrogram uses."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - fft_hz[None, :]           # (n_mels + 2, frequencies)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


_FILTERBANK = torch.from_numpy(mel_filterbank())


def mel_frames(wavs: torch.Tensor) -> torch.Tensor:
    """(..., samples) 16 kHz audio -> (..., 1 + samples // 160, 40) mel power spectrogram, in
    the dtype and on the device of ``wavs`` (float64 gives the closest match to librosa)."""
    window = torch.hann_window(MEL_WINDOW, periodic=True, dtype=wavs.dtype, device=wavs.device)
    shape = wavs.shape[:-1]
    spectrum = torch.stft(wavs.reshape(-1, wavs.shape[-1]), n_fft=MEL_WINDOW, hop_length=MEL_HOP,
                          window=window, center=True, pad_mode="constant", return_complex=True)
    power = spectrum.real.square() + spectrum.imag.square()          # (batch, frequencies, frames)
    mel = _FILTERBANK.to(dtype=wavs.dtype, device=wavs.device) @ power
    return mel.transpose(-1, -2).reshape(*shape, -1, N_MELS)


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """float 16 kHz mono audio -> (frames, 40) float32: resemblyzer's ``wav_to_mel_spectrogram``.
    Computed in float64 (librosa's float32 STFT differs from it by ~1e-6 relative)."""
    with torch.no_grad():
        return mel_frames(torch.from_numpy(np.asarray(wav, dtype=np.float64))).numpy().astype(np.float32)


def partial_slices(n_samples: int, rate: float = PARTIALS_PER_SECOND,
                   min_coverage: float = MIN_COVERAGE) -> list[slice]:
    """Mel-frame slices of the 160-frame partials of an ``n_samples`` utterance (resemblyzer's
    ``compute_partial_slices``): one every ``round(16000 / rate / 160)`` frames (77 at 1.3 / s) while
    a partial still starts inside the utterance; the last is dropped if under ``min_coverage``
    of its samples are audio (unless it is the only one). Slices may reach past the end: the
    audio is zero-padded to ``slices[-1].stop * 160`` samples."""
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage {min_coverage}: expected 0 < min_coverage <= 1")
    n_frames = int(np.ceil((n_samples + 1) / MEL_HOP))
    frame_step = int(np.round(SAMPLE_RATE / rate / MEL_HOP))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate}: expected {SAMPLE_RATE / (MEL_HOP * PARTIAL_FRAMES)} (partials that "
                         f"touch) to {SAMPLE_RATE / MEL_HOP} (one per frame) partials per second")
    starts = range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step)
    slices = [slice(start, start + PARTIAL_FRAMES) for start in starts]
    last_start = slices[-1].start * MEL_HOP
    coverage = (n_samples - last_start) / (PARTIAL_FRAMES * MEL_HOP)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


def partial_mels(wav: np.ndarray, rate: float = PARTIALS_PER_SECOND,
                 min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """(partials, 160, 40) float32 mel windows of a preprocessed 16 kHz utterance."""
    wav = np.asarray(wav, dtype=np.float32)
    slices = partial_slices(len(wav), rate, min_coverage)
    # The mel is computed on the padded wav, as resemblyzer does: the frames near the end
    # see zeros, not the reflection or the cut of the audio.
    padded = np.pad(wav, (0, max(0, slices[-1].stop * MEL_HOP - len(wav))))
    mel = mel_spectrogram(padded)
    return np.stack([mel[s] for s in slices])


class GE2EEncoder(nn.Module):
    """GE2E's network; parameter names match resemblyzer's state dict (``lstm.*``, ``linear.*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN_SIZE, LSTM_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN_SIZE, EMBEDDING_SIZE)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 40) mel power spectrograms (160 frames in training) -> (batch, 256)
        unit-length embeddings; ReLU before normalising, so every component is >= 0."""
        _, (hidden, _) = self.lstm(mels)
        embeddings = self.relu(self.linear(hidden[-1]))
        return embeddings / torch.norm(embeddings, dim=1, keepdim=True)

    def freeze(self) -> "GE2EEncoder":
        """No gradients for any parameter (a fixed backbone); returns self."""
        self.requires_grad_(False)
        return self

    def embed_partials(self, wav: np.ndarray, rate: float = PARTIALS_PER_SECOND,
                       min_coverage: float = MIN_COVERAGE) -> torch.Tensor:
        """(partials, 256) embeddings of a preprocessed 16 kHz utterance's partials, with
        gradients if the parameters have them (for fine-tuning on utterances)."""
        device = next(self.parameters()).device
        return self(torch.from_numpy(partial_mels(wav, rate, min_coverage)).to(device))

    def embed_utterances(self, wavs: list[np.ndarray], max_partials: int = 512) -> np.ndarray:
        """(len(wavs), 256) float32: ``embed_utterance`` of each, with the partials of many
        utterances in one forward pass (the LSTM's 160 steps cost about the same for 7 rows or
        500, so this is several times faster per utterance; the results agree with one at a
        time to float rounding, ~1e-7)."""
        mels = [partial_mels(wav) for wav in wavs]
        counts = [len(m) for m in mels]
        device = next(self.parameters()).device
        out = []
        with torch.no_grad():
            stacked = np.concatenate(mels) if mels else np.zeros((0, PARTIAL_FRAMES, N_MELS), np.float32)
            for start in range(0, len(stacked), max_partials):
                out.append(self(torch.from_numpy(stacked[start:start + max_partials]).to(device)).cpu().numpy())
        partials = np.concatenate(out) if out else np.zeros((0, EMBEDDING_SIZE), np.float32)
        embeddings = np.zeros((len(wavs), EMBEDDING_SIZE), np.float32)
        for i, (first, count) in enumerate(zip(np.cumsum([0] + counts[:-1]), counts)):
            mean = partials[first:first + count].mean(axis=0)
            embeddings[i] = mean / np.linalg.norm(mean)
        return embeddings

    def embed_utterance(self, wav: np.ndarray, rate: float = PARTIALS_PER_SECOND,
                        min_coverage: float = MIN_COVERAGE) -> np.ndarray:
        """(256,) float32 unit-length embedding of a preprocessed 16 kHz utterance: the mean of
        its partials' embeddings, normalised again."""
        with torch.no_grad():
            partials = self.embed_partials(wav, rate, min_coverage).cpu().numpy()
        mean = partials.mean(axis=0)
        return mean / np.linalg.norm(mean)


def pretrained_weights_path() -> Path:
    """``pretrained.pt`` inside the installed resemblyzer package (found without importing it:
    its import pulls librosa and webrtcvad). FileNotFoundError with the install command."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"GE2E weights: the resemblyzer package is not installed ({INSTALL_COMMAND})")
    path = Path(spec.origin).parent / "pretrained.pt"
    if not path.is_file():
        raise FileNotFoundError(f"GE2E weights: {path} is missing; reinstall resemblyzer ({INSTALL_COMMAND})")
    return path


def load_pretrained_ge2e(device: str | torch.device = "cpu") -> GE2EEncoder:
    """The GE2E encoder with resemblyzer's trained weights, in eval mode, parameters trainable."""
    checkpoint = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    # The checkpoint also holds the GE2E loss's similarity scale and bias (similarity_weight,
    # similarity_bias), which only training with that loss uses; every network weight must be there.
    state = {k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity_")}
    model = GE2EEncoder()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def preprocess_wav(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """What the GE2E weights expect of an utterance, done by resemblyzer itself: resampled to
    16 kHz (librosa), volume raised (never lowered) to -30 dBFS, silences longer than ~0.2 s
    removed (WebRTC VAD, aggressiveness 3, 30 ms windows, smoothed over 8, dilated by 6)."""
    import warnings

    with warnings.catch_warnings():
        # resemblyzer 0.1.4 imports binary_dilation from scipy.ndimage.morphology (deprecated)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from resemblyzer import preprocess_wav as resemblyzer_preprocess
        except ImportError as error:
            raise RuntimeError(f"GE2E preprocessing needs resemblyzer and webrtcvad ({INSTALL_COMMAND}): "
                               f"{error}") from None
    # source_sr=None skips librosa.resample, whose first call costs seconds even at equal rates
    return resemblyzer_preprocess(np.asarray(wav, dtype=np.float32),
                                  source_sr=None if sample_rate == SAMPLE_RATE else sample_rate)
