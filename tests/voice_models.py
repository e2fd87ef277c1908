"""Small, seeded voice encoder and face decoder whose outputs depend visibly on the voice,
shared by the tests of ``speech2face predict`` (test_cli.py) and ``speech2face serve``
(test_serve.py). Why they are built like this: test_cli.py's docstring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from speech2face.data.audio import SpectrogramSettings, spectrogram_batch
from speech2face.models.encoder_io import save_encoder
from speech2face.models.face_decoder import FaceDecoder, save_decoder
from speech2face.models.voice_encoder import VoiceEncoder
from speech2face.voice_to_face import load_voice

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
LIBRISPEECH = MEDIA / "speech" / "librispeech"
LANDMARKS = Path(__file__).parent / "fixtures" / "face_landmarks.npy"
SETTINGS = SpectrogramSettings()          # the paper's: 6 s, 16 kHz, 400/160/512, power 0.3
WIDTH = 0.03125
FEATURE_DIM = 128


def calibrated_encoder(seed: int) -> tuple[VoiceEncoder, torch.Tensor]:
    """Encoder whose batch-norm statistics are those of real speech (first 6 s of four
    speakers); returns it with those recordings' features."""
    torch.manual_seed(seed)
    encoder = VoiceEncoder(out_dim=FEATURE_DIM, width=WIDTH, input_mode="magnitude")
    speakers = sorted(p for p in LIBRISPEECH.iterdir() if p.is_dir())[:4]
    clips = [load_voice(sorted(s.glob("*.flac"))[0], SETTINGS.sample_rate) for s in speakers]
    spectrograms = torch.from_numpy(spectrogram_batch(clips, SETTINGS))
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None            # plain average over the calibration batch
    with torch.no_grad():
        encoder.train()
        encoder(spectrograms)
        encoder.eval()
        return encoder, encoder(spectrograms)


def visible_decoder(seed: int, features: torch.Tensor) -> FaceDecoder:
    torch.manual_seed(seed)
    mean_landmarks = torch.from_numpy(np.load(LANDMARKS)[0]) / 223      # crop pixels -> fractions
    photo = Image.open(MEDIA / "faces" / "astronaut.png").convert("RGB").resize((224, 224))
    mean_texture = torch.from_numpy(np.asarray(photo, np.float32) / 255).permute(2, 0, 1)
    decoder = FaceDecoder(in_dim=FEATURE_DIM, width=WIDTH, mean_landmarks=mean_landmarks,
                          mean_texture=mean_texture, feature_mean=features.mean(0), feature_std=features.std(0))
    with torch.no_grad():
        torch.nn.init.normal_(decoder.landmark_mlp[-1].weight, std=0.02)    # moves landmarks ~5 px
        torch.nn.init.normal_(decoder.texture_convs[-1].weight, std=0.3)    # repaints the texture
    return decoder


def write_models(folder: Path) -> tuple[Path, Path, torch.Tensor]:
    """models/voice_encoder.pt and models/face_decoder.pt (+ .json) under ``folder``, as the
    pipeline saves them; returns their paths and the calibration recordings' features."""
    encoder, features = calibrated_encoder(seed=0)
    decoder = visible_decoder(seed=1, features=features)
    encoder_path = folder / "models" / "voice_encoder.pt"
    decoder_path = folder / "models" / "face_decoder.pt"
    encoder_path.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(encoder, encoder_path, WIDTH, spectrogram=SETTINGS.as_dict())
    save_decoder(decoder, decoder_path)
    return encoder_path, decoder_path, features
