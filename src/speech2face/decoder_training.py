"""Face-decoder training: one loop, readable top to bottom.

Losses (Cole et al. 2017), each weighted in params:
- texture: mean absolute error between the decoded texture and the target texture (the
  training face warped to the mean landmarks);
- landmarks: mean squared error of the predicted landmarks (fractions of the image side);
- identity: 1 - cosine similarity between the face embedding of the decoded image and the
  input feature (the paper's negative cosine, shifted by 1 so the loss is >= 0; the same
  gradient). The embedding network is frozen and differentiable (``IdentityNet``).

A checkpoint is written after every epoch (atomically) and training resumes from it; the
weights of the epoch with the lowest validation loss are the ones returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import FaceDecoder
from .face_data import Faces, crops_to_tensor, mean_landmarks, target_textures
from .determinism import fix_threads
from .fsutil import atomic_path, save_torch
from .reporting import progress
from .training import TrainingError, best_epoch, load_checkpoint, make_optimizer, pick_device, save_checkpoint

IDENTITY_NETS = ("dlib", "vggface", "none")


@dataclass
class DecoderConfig:
    width: float = 0.25
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_decay: float = 1.0
    lr_decay_steps: int = 10000
    seed: int = 0
    texture_weight: float = 1.0
    landmark_weight: float = 100.0
    identity_weight: float = 1.0
    identity_net: str = "dlib"      # IDENTITY_NETS
    threads: int = 2                # torch/BLAS threads: fixed, so results do not depend on the machine


class IdentityNet(torch.nn.Module):
    """Frozen, differentiable face embedding of decoded images: (B,3,S,S) in [0,1] plus
    landmarks (B,68,2) in pixels -> (B, dim).

    ``dlib``: a torch replica of dlib's ResNet (the network behind the dlib128 features),
    run on 150x150 chips cut the way dlib cuts them (``dlib_resnet``); its output is the
    same embedding the face stage computed, so the loss compares like with like.
    ``vggface``: the VGG-Face backend's fc7 on the 224x224 image (the crop geometry of the
    face stage), for features from ``vggface4096``.
    """

    def __init__(self, kind: str, vggface_weights: str | None = None):
        super().__init__()
        self.kind = kind
        if kind == "dlib":
            from .dlib_resnet import load_dlib_face_net

            self.net = load_dlib_face_net()
        elif kind == "vggface":
            from .face_backends import make_backend

            self.net = make_backend("vggface4096", vggface_weights, device="cpu").model
        else:
            raise ValueError(f"unknown identity net {kind!r}: expected one of {list(IDENTITY_NETS[:2])}")
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: batch statistics never update
        return super().train(False)

    def forward(self, images: torch.Tensor, landmarks_px: torch.Tensor) -> torch.Tensor:
        if self.kind == "dlib":
            from .dlib_resnet import extract_face_chips

            chips = extract_face_chips(images * 255.0, landmarks_px)
            return self.net(chips)
        return self.net.features(images * 255.0)


@dataclass
class DecoderLoss:
    texture_weight: float = 1.0
    landmark_weight: float = 100.0
    identity_weight: float = 1.0
    identity_net: IdentityNet | None = None

    def terms(self, output: dict, target_texture: torch.Tensor, target_landmarks: torch.Tensor,
              features: torch.Tensor, image_size: int) -> dict[str, torch.Tensor]:
        terms = {"texture_l1": self.texture_weight * (output["texture"] - target_texture).abs().mean(),
                 "landmark_mse": self.landmark_weight * F.mse_loss(output["landmarks"], target_landmarks)}
        if self.identity_net is not None and self.identity_weight:
            # the chip is cut with the predicted landmarks held fixed: the identity term
            # shapes the texture, the landmark term the geometry
            embedded = self.identity_net(output["image"], output["landmarks"].detach() * (image_size - 1))
            cosine = F.cosine_similarity(embedded, features, dim=-1)
            terms["identity"] = self.identity_weight * (1 - cosine).mean()
        terms["total"] = sum(terms.values())
        return terms


@dataclass
class DecoderData:
    """Everything one split contributes to training, as tensors."""

    features: torch.Tensor      # (n, dim)
    textures: torch.Tensor      # (n, 3, S, S) targets at the mean geometry
    landmarks: torch.Tensor     # (n, 68, 2) fractions of the side

    def __len__(self) -> int:
        return len(self.features)


def prepare(faces: Faces, mean: np.ndarray, split: str = "train") -> DecoderData:
    for name in ("features", "landmarks"):
        bad = np.flatnonzero(~np.isfinite(getattr(faces, name)).reshape(len(faces), -1).all(axis=1))
        if len(bad):
            clips = ", ".join(str(c) for c in faces.table["clip_id"].iloc[bad[:3]])
            raise TrainingError(f"{len(bad)} {split} face(s) have NaN or infinite {name} (clips {clips}): "
                                f"rerun the faces stage")
    return DecoderData(torch.from_numpy(faces.features), target_textures(faces, mean),
                       torch.from_numpy(faces.landmarks / (faces.crop_size - 1)))


def decoder_output(model: FaceDecoder, features: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """``model(features)``, with a diverged network reported as a TrainingError: its landmarks
    reach the warp as NaN/inf (ValueError from the warp) or so far apart or on top of each
    other that the spline system is singular (LinAlgError), before any loss is computed."""
    try:
        return model(features)
    except (ValueError, torch.linalg.LinAlgError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"the decoder diverged {where} (the warp failed: {message}): "
                            f"lower decoder.lr") from None


def evaluate_loss(model: FaceDecoder, data: DecoderData, loss_fn: DecoderLoss, device, batch_size: int) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            s = slice(start, start + batch_size)
            features = data.features[s].to(device)
            output = decoder_output(model, features, "on the validation faces")
            terms = loss_fn.terms(output, data.textures[s].to(device), data.landmarks[s].to(device), features,
                                  model.image_size)
            total += float(terms["total"]) * len(features)
    model.train()
    return total / max(len(data), 1)


def train_decoder(config: DecoderConfig, train: Faces, val: Faces | None, checkpoint: Path,
                  loss_fn: DecoderLoss, on_epoch: Callable[[dict, FaceDecoder], None] | None = None
                  ) -> tuple[FaceDecoder, list[dict]]:
    """Train (or resume); return the model of the best validation epoch and one history row
    per epoch."""
    if not len(train):
        raise TrainingError("no training faces: run the faces stage first (dvc repro faces)")
    device = pick_device()
    fix_threads(config.threads)
    torch.manual_seed(config.seed)
    mean = mean_landmarks(train)
    train_data = prepare(train, mean, "train")
    val_data = prepare(val, mean, "val") if val is not None and len(val) else None
    # the decoder reads each input at the training features' mean length (see decoder.py)
    feature_norm = float(train_data.features.norm(dim=1).mean())
    rescaled = F.normalize(train_data.features, dim=1) * feature_norm
    # one training face has no spread (std would be NaN and every output NaN): do not scale
    feature_std = rescaled.std(dim=0) if len(train_data) > 1 else torch.ones(rescaled.shape[1])
    model = FaceDecoder(in_dim=train.features.shape[1], width=config.width, image_size=train.crop_size,
                        mean_landmarks=torch.from_numpy(mean), mean_texture=train_data.textures.mean(dim=0),
                        feature_mean=rescaled.mean(dim=0), feature_std=feature_std, feature_norm=feature_norm)
    model = model.to(device)
    if loss_fn.identity_net is not None:
        loss_fn.identity_net.to(device)
    optimizer, schedule = make_optimizer(model, config)
    start_epoch, step, history = 0, 0, []
    best_path = checkpoint.with_name("best.pt")
    if checkpoint.exists():
        start_epoch, step, history = load_checkpoint(checkpoint, model, optimizer, schedule)
        print(f"train_decoder: resuming from {checkpoint} after epoch {start_epoch}", flush=True)

    generator = torch.Generator().manual_seed(config.seed)
    n_batches = max(1, len(train_data) // config.batch_size)
    for epoch in range(start_epoch, config.epochs):
        generator.manual_seed(config.seed * 1000003 + epoch)   # resumable: order depends on the epoch only
        order = torch.randperm(len(train_data), generator=generator)
        started, sums = time.perf_counter(), {}
        bar = progress(range(n_batches), f"train_decoder epoch {epoch + 1}/{config.epochs}", unit="batch")
        for b in bar:
            rows = order[b * config.batch_size:(b + 1) * config.batch_size]
            features = train_data.features[rows].to(device)
            output = decoder_output(model, features, f"at epoch {epoch + 1}, step {step}")
            terms = loss_fn.terms(output, train_data.textures[rows].to(device),
                                  train_data.landmarks[rows].to(device), features, model.image_size)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite decoder loss ({loss.item()}) at epoch {epoch + 1}, step {step}: "
                                    f"lower decoder.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['total'] / (b + 1):.4f}")
        row = {"epoch": epoch + 1, "step": step, **{f"train_{k}": v / n_batches for k, v in sums.items()},
               "val_loss": (evaluate_loss(model, val_data, loss_fn, device, config.batch_size)
                            if val_data is not None else math.nan),
               "seconds": time.perf_counter() - started}
        row["train_loss"] = row.pop("train_total")
        history.append(row)
        if best_epoch(history) == epoch + 1:
            save_torch(model.state_dict(), best_path)
        save_checkpoint(checkpoint, model, optimizer, schedule, epoch + 1, step, history)
        print(f"train_decoder: epoch {epoch + 1}/{config.epochs} train_loss {row['train_loss']:.4f} "
              f"val_loss {row['val_loss']:.4f} ({row['seconds']:.1f} s)", flush=True)
        if on_epoch:
            on_epoch(row, model)
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    return model.eval(), history


def decode(model: FaceDecoder, features: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) features -> decoded faces (n, S, S, 3) uint8 and their landmarks (n, 68, 2)
    in pixels."""
    from .decoder import to_uint8

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


def face_grid(rows: list[np.ndarray], path: Path, labels: list[str] | None = None) -> None:
    """Rows of equal-size uint8 face images -> one PNG (no axes; a label column if given)."""
    from PIL import Image, ImageDraw

    tiles = [np.concatenate(list(row), axis=1) for row in rows]
    grid = np.concatenate(tiles, axis=0)
    image = Image.fromarray(grid)
    if labels:
        draw = ImageDraw.Draw(image)
        width = grid.shape[1] // len(rows[0])
        for c, label in enumerate(labels):
            draw.text((c * width + 4, 4), label, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


__all__ = ["DecoderConfig", "DecoderLoss", "IdentityNet", "train_decoder", "decode", "face_grid",
           "crops_to_tensor", "IDENTITY_NETS"]
