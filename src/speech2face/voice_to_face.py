"""Any voice recording -> a face image, with the trained encoder and decoder.

The recording (any file ffmpeg reads: any rate, length, channel count) is decoded to 16 kHz
mono, cut into consecutive windows of the encoder's training length (``spectrogram.seconds``,
6 s by default; a shorter recording is looped to fill one window, as in training), each window
becomes a spectrogram with the training settings, and the encoder's features of the windows
are averaged (up to ``max_windows`` evenly spread windows: one voice, one face). The decoder
turns the mean feature into the face. Only the first ``max_seconds`` (10 minutes by default)
are decoded, so a recording of any length takes bounded memory.

A voice head (GE2E + head, speech2face.models.voice_head) takes the recording its own way,
as it was trained: the whole decoded audio (up to ``max_seconds``) through resemblyzer's
preprocessing when its file says so, cut into GE2E's 1.6 s partials, one utterance
embedding, one feature (``VoiceHeadSettings``; ``Prediction.windows`` counts the partials).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech2face.core.errors import Speech2FaceError
from speech2face.data.audio import SpectrogramSettings, spectrogram_batch
from speech2face.data.media import MediaError, decode_audio, probe
from speech2face.models.face_decoder import FaceDecoder, to_uint8
from speech2face.models.voice_encoder import VoiceEncoder
from speech2face.models.voice_head import PartialMels, VoiceHead, predict_clips

MAX_SECONDS = 600.0


class VoiceError(Speech2FaceError, ValueError):
    """The recording cannot be used (missing, no audio stream, unreadable, empty, silent)."""


@dataclass
class Prediction:
    image: np.ndarray           # (S, S, 3) uint8
    feature: np.ndarray         # (dim,) predicted face feature
    landmarks: np.ndarray       # (68, 2) pixels
    windows: int                # how many windows were averaged
    seconds: float              # length of the recording


def _ffmpeg_reason(error: MediaError, path: Path) -> str:
    """ffmpeg's last line without the file name it starts with (the message already has it)."""
    detail = error.detail or error.reason
    prefix = f"{path}: "
    return detail[len(prefix):] if detail.startswith(prefix) else detail


def load_voice(path: str | Path, sample_rate: int, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """float32 mono samples in [-1, 1) at ``sample_rate`` of the first ``max_seconds`` of the
    recording; ``VoiceError`` with one line when unusable. Decoded exactly as the extract stage decodes training clips (ffmpeg, first audio
    stream, ``ac=1`` = mean of the channels, ``ar`` = ffmpeg's default resampler), so a
    recording reaches the encoder as the training audio did."""
    path = Path(path)
    if not path.is_file():
        raise VoiceError(f"{path}: no such file")
    try:
        info = probe(path)
    except MediaError as error:
        raise VoiceError(f"{path}: not a media file ffmpeg can read ({_ffmpeg_reason(error, path)})") from None
    if not info.has_audio:
        raise VoiceError(f"{path}: has no audio stream")
    try:
        samples = decode_audio(path, sample_rate, max_seconds)
    except MediaError as error:
        raise VoiceError(f"{path}: audio cannot be decoded ({_ffmpeg_reason(error, path)})") from None
    if not len(samples):   # e.g. a valid header followed by corrupt frames
        raise VoiceError(f"{path}: no audio could be decoded (empty or corrupt audio stream)")
    if not np.any(samples):
        raise VoiceError(f"{path}: the audio is silent")
    voice = samples.astype(np.float32)
    voice /= 32768.0   # in place: a long recording is not held twice
    return voice


def windows(samples: np.ndarray, n: int, max_windows: int) -> list[np.ndarray]:
    """Consecutive n-sample windows (evenly spread when there are more than max_windows);
    audio shorter than one window is returned whole (looped later)."""
    count = len(samples) // n
    if count <= 1:
        return [samples]
    starts = np.linspace(0, (count - 1) * n, min(count, max_windows)).round().astype(int)
    return [samples[s:s + n] for s in starts]


@dataclass(frozen=True)
class VoiceHeadSettings:
    """How a voice head takes a recording (its file's ``front_end``)."""
    preprocess: bool = True      # resemblyzer's volume normalisation + VAD
    sample_rate: int = 16000


def encode_with_voice_head(samples: np.ndarray, model: VoiceHead, settings: VoiceHeadSettings
                           ) -> tuple[torch.Tensor, int]:
    """(the voice head's face feature (dim,), partials embedded) of float 16 kHz samples."""
    from speech2face.data.speaker_embeddings import voiced_wav

    wav = voiced_wav(samples, settings.preprocess)
    if wav is None:
        raise VoiceError("no voice left after voice-activity detection (silence or noise only)")
    inputs = PartialMels.of_wavs([wav], ["voice"])
    return torch.from_numpy(predict_clips(model, inputs)[0]), len(inputs.owner)


def encode_voice(samples: np.ndarray, encoder: VoiceEncoder | VoiceHead,
                 settings: SpectrogramSettings | VoiceHeadSettings, max_windows: int = 8) -> tuple[torch.Tensor, int]:
    """(the encoder's face feature of the voice (dim,), windows averaged): float samples at
    ``settings.sample_rate`` (``load_voice``), each window's spectrogram through the encoder
    (a voice head: ``encode_with_voice_head``)."""
    if isinstance(encoder, VoiceHead):
        return encode_with_voice_head(samples, encoder, settings)
    chunks = windows(samples, settings.n_samples, max_windows)
    spectrograms = torch.from_numpy(spectrogram_batch(chunks, settings))
    if spectrograms.shape[-2] != encoder.n_freq:
        raise VoiceError(f"the encoder expects {encoder.n_freq} frequencies, the spectrogram settings give "
                         f"{spectrograms.shape[-2]}")
    encoder.eval()
    with torch.no_grad():
        return encoder(spectrograms).float().mean(dim=0), len(chunks)


def predict_face(path: str | Path, encoder: VoiceEncoder | VoiceHead, decoder: FaceDecoder,
                 settings: SpectrogramSettings | VoiceHeadSettings, max_windows: int = 8,
                 max_seconds: float = MAX_SECONDS) -> Prediction:
    samples = load_voice(path, settings.sample_rate, max_seconds)
    feature, n_windows = encode_voice(samples, encoder, settings, max_windows)
    decoder.eval()
    with torch.no_grad():
        output = decoder(feature[None])
    return Prediction(image=to_uint8(output["image"])[0], feature=feature.numpy(),
                      landmarks=output["landmarks"][0].numpy() * (decoder.image_size - 1),
                      windows=n_windows, seconds=len(samples) / settings.sample_rate)
