"""Face decoder (Cole et al., CVPR 2017): face feature -> frontal face image.

    feature --fc+ReLU--> h (1000)      <- f_dec, the layer the encoder's loss compares
    h --MLP--> landmarks (68 x 2, fractions of the image side)
    h --fc--> 14x14xC0 --[convT k5 s2, ReLU]x4--> 224x224xC4 --1x1 conv--> texture (RGB)
    image = sparse_image_warp(texture, from the mean landmarks to the predicted landmarks)

The texture is registered to the mean face geometry (every training target is its face
warped to the mean landmarks), so the convolutional branch only has to paint appearance and
the landmark branch carries the shape; the differentiable spline warp puts them together.
Inputs are rescaled to the training features' mean length, then standardised with their
mean and std (buffers).

Channels: C_i = max(256 / 2**i, 32) (Cole et al.), all multiplied by ``width`` so a CPU can
train it (width 1 is the paper's size). Both outputs are residuals around the training
means (``mean_texture``, ``mean_landmarks``, buffers saved with the weights): on a few
hundred faces the network then starts from the average face instead of grey noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speech2face.core.model_files import ModelFileError, load_model, save_model
from speech2face.models.warp import sparse_image_warp

TEXTURE_GRID = 14
N_LANDMARKS = 68
SHARED_UNITS = 1000
LANDMARK_HIDDEN = 800
UPSAMPLINGS = 4          # 14 -> 28 -> 56 -> 112 -> 224
# The warp's spline is evaluated on a 57 x 57 grid and resampled to 224 x 224: 1/16 of the
# work, within 0.01 px of the exact flow on average, 0.4 px at worst next to a landmark
# (tests/models/test_warp.py); the exact flow made the warp 80% of a training step.
FLOW_GRID = 57


class DecoderError(ModelFileError):
    """A decoder cannot be loaded (missing files, wrong shapes)."""


def decoder_channels(width: float) -> list[int]:
    """Channels after the fc layer and after each transposed convolution."""
    return [max(1, round(max(256 / 2 ** i, 32) * width)) for i in range(UPSAMPLINGS + 1)]


class FaceDecoder(nn.Module):
    def __init__(self, in_dim: int = 128, width: float = 1.0, image_size: int = 224,
                 mean_landmarks: torch.Tensor | None = None, mean_texture: torch.Tensor | None = None,
                 feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None,
                 feature_norm: float = 0.0, shared_units: int = SHARED_UNITS):
        super().__init__()
        if image_size != TEXTURE_GRID * 2 ** UPSAMPLINGS:
            raise ValueError(f"image_size must be {TEXTURE_GRID * 2 ** UPSAMPLINGS}, got {image_size}")
        self.in_dim, self.width, self.image_size = in_dim, width, image_size
        channels = decoder_channels(width)
        self.shared = nn.Sequential(nn.Linear(in_dim, shared_units), nn.ReLU())
        hidden = max(16, round(LANDMARK_HIDDEN * width))
        self.landmark_mlp = nn.Sequential(nn.Linear(shared_units, hidden), nn.ReLU(),
                                          nn.Linear(hidden, N_LANDMARKS * 2))
        self.texture_fc = nn.Linear(shared_units, TEXTURE_GRID * TEXTURE_GRID * channels[0])
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, kernel_size=5, stride=2, padding=2,
                                                     output_padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(channels[-1], 3, kernel_size=1)]
        self.texture_convs = nn.Sequential(*layers)
        self.channels = channels
        # small last layers: the first outputs are the means themselves. The std is divided
        # by sqrt(fan_in) so an output's spread (std * sqrt(fan_in) * activation size) does not
        # grow with the width: a fixed 1e-3 moved the first landmarks by up to 3.5 px at width 1
        # (800 hidden units), 0.1 px now. Not zero, so gradients reach the earlier layers.
        for last in (self.landmark_mlp[-1], self.texture_convs[-1]):
            fan_in = last.weight[0].numel()
            nn.init.normal_(last.weight, std=1e-3 / fan_in ** 0.5)
            nn.init.zeros_(last.bias)
        # Input standardisation (training mean and std per dimension): face embeddings of
        # different people share most of their direction (dlib: cosine ~0.9), so raw inputs
        # hardly differ and the decoder would learn only the mean face.
        # Input length (> 0: every input is rescaled to this norm, the training features' mean
        # norm, before standardisation). The encoder's default loss (normalised L2) fixes the
        # direction of its prediction but not its length, and dlib embeddings of faces all
        # have about the same length (~1.4 for dlib128, std ~2%): the decoder reads the
        # direction, so a voice prediction of any scale decodes to a face, not a saturated
        # blur. 0 = inputs used as they are.
        self.register_buffer("feature_norm", torch.tensor(float(feature_norm)))
        self.register_buffer("feature_mean", torch.zeros(in_dim) if feature_mean is None
                             else feature_mean.detach().clone().float())
        self.register_buffer("feature_std", torch.ones(in_dim) if feature_std is None
                             else feature_std.detach().clone().float().clamp_min(1e-6))
        self.register_buffer("mean_landmarks", torch.full((N_LANDMARKS, 2), 0.5) if mean_landmarks is None
                             else mean_landmarks.detach().clone().float())
        self.register_buffer("mean_texture", torch.full((3, image_size, image_size), 0.5) if mean_texture is None
                             else mean_texture.detach().clone().float())

    def f_dec(self, features: torch.Tensor) -> torch.Tensor:
        """The shared first layer (feature -> 1000, ReLU), used by the encoder's loss."""
        if self.feature_norm > 0:
            features = F.normalize(features, dim=-1) * self.feature_norm
        return self.shared((features - self.feature_mean) / self.feature_std)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B, in_dim) -> texture (B,3,S,S) at the mean geometry, landmarks (B,68,2)
        as fractions of S, image (B,3,S,S); colours in [0, 1] (not clamped: the losses see
        the raw values, ``to_uint8`` clamps)."""
        h = self.f_dec(features)
        landmarks = self.mean_landmarks + self.landmark_mlp(h).view(-1, N_LANDMARKS, 2)
        grid = self.texture_fc(h).view(-1, self.channels[0], TEXTURE_GRID, TEXTURE_GRID)
        texture = self.mean_texture + self.texture_convs(grid)
        image = self.warp_to(texture, landmarks)
        return {"texture": texture, "landmarks": landmarks, "image": image}

    def warp_to(self, texture: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Move the mean-geometry texture so its landmarks land on ``landmarks``."""
        scale = self.image_size - 1
        source = (self.mean_landmarks * scale).expand_as(landmarks)
        warped, _ = sparse_image_warp(texture, source, landmarks * scale, flow_grid=FLOW_GRID)
        return warped


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,S,S) float in [0,1] -> (B,S,S,3) uint8."""
    return (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_decoder(model: FaceDecoder, path: Path) -> None:
    save_model(model, path, {"in_dim": model.in_dim, "width": model.width, "image_size": model.image_size})


# Bounds of the sizes a model JSON may ask for (Cole et al.'s decoder: width 1, 4096-D in).
SIZE_LIMITS = {"in_dim": (1, 8192), "width": (1e-3, 2.0), "image_size": (224, 224)}


def load_decoder(path: str | Path, device: str | torch.device = "cpu") -> FaceDecoder:
    """``DecoderError`` (one line) when the files are missing or unusable."""
    try:
        return load_model(path, lambda meta: FaceDecoder(in_dim=meta["in_dim"], width=meta["width"],
                                                         image_size=meta["image_size"]),
                          "face decoder", "train_decoder", device, limits=SIZE_LIMITS)
    except ModelFileError as error:
        raise DecoderError(str(error)) from None


def decode(model: FaceDecoder, features: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) features -> decoded faces (n, S, S, 3) uint8 and their landmarks (n, 68, 2)
    in pixels."""
    device = next(model.parameters()).device
    images, landmarks = [], []
    was_training = model.training   # called between training epochs too
    model.eval()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = torch.as_tensor(np.asarray(features[start:start + batch_size], np.float32), device=device)
            output = model(batch)
            images.append(to_uint8(output["image"]))
            landmarks.append(output["landmarks"].cpu().numpy() * (model.image_size - 1))
    model.train(was_training)
    size = model.image_size
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 68, 2), np.float32)
    return np.concatenate(images), np.concatenate(landmarks).astype(np.float32)
