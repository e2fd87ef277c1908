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

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from speech2face.core import shards, tracking
from speech2face.core.allocator import keep_freed_memory
from speech2face.core.determinism import fix_threads
from speech2face.core.params import check, setting
from speech2face.core.paths import ProjectPaths
from speech2face.core.pictures import face_grid
from speech2face.core.reporting import progress
from speech2face.data import face_data
from speech2face.data.face_data import Faces, crops_to_tensor, load_faces, mean_landmarks, target_textures
from speech2face.data.faces import FacesConfig
from speech2face.models import face_decoder, warp
from speech2face.models.dlib import chips, network
from speech2face.models.face_decoder import FaceDecoder, decode, save_decoder
from speech2face.training import loop as loop_module
from speech2face.training.loop import (TrainingConfig, TrainingError, TrainingLoop, finish_run, kept_epoch,
                                       log_epoch_metrics, pick_device)

IDENTITY_NETS = ("dlib", "vggface", "none")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig(TrainingConfig):
    SECTION: ClassVar[str] = "decoder"
    epochs: int = setting(20, above=0)                 # (lr, betas, eps, decay: TrainingConfig's)
    batch_size: int = setting(16, above=0)
    width: float = setting(0.25, above=0)              # channel multiplier; 1.0 = Cole et al.'s size (52 M parameters)
    texture_weight: float = setting(1.0, minimum=0)    # L1 of the texture (at the mean face geometry)
    landmark_weight: float = setting(100.0, minimum=0)  # MSE of landmarks (fractions of the image side)
    identity_weight: float = setting(1.0, minimum=0)   # 1 - cosine(embedding of the decoded face, input feature)
    identity_net: str = setting("dlib", choices=IDENTITY_NETS)   # dlib | vggface | none


class IdentityNet(torch.nn.Module):
    """Frozen, differentiable face embedding of decoded images: (B,3,S,S) in [0,1] plus
    landmarks (B,68,2) in pixels -> (B, dim).

    ``dlib``: a torch replica of dlib's ResNet (the network behind the dlib128 features),
    run on 150x150 chips cut the way dlib cuts them (``speech2face.models.dlib.chips``); its output is the
    same embedding the face stage computed, so the loss compares like with like.
    ``vggface``: the VGG-Face backend's fc7 on the 224x224 image (the crop geometry of the
    face stage), for features from ``vggface4096``.
    """

    def __init__(self, kind: str, vggface_weights: str | None = None):
        super().__init__()
        self.kind = kind
        if kind == "dlib":
            from speech2face.models.dlib.network import load_dlib_face_net

            self.net = load_dlib_face_net()
        elif kind == "vggface":
            from speech2face.data.face_backends import make_backend

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
            from speech2face.models.dlib.chips import extract_face_chips

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
    # channels-last weights: about 1.35x faster steps on CPU (benchmarks/bench_layout.py); the
    # identity net gains nothing from it and keeps its layout
    model = model.to(device, memory_format=torch.channels_last)
    if loss_fn.identity_net is not None:
        loss_fn.identity_net.to(device)
    loop = TrainingLoop("train_decoder", model, config, checkpoint, device)

    generator = torch.Generator().manual_seed(config.seed)
    n_batches = max(1, len(train_data) // config.batch_size)

    def one_epoch(epoch: int) -> dict:
        generator.manual_seed(config.seed * 1000003 + epoch)   # resumable: order depends on the epoch only
        order = torch.randperm(len(train_data), generator=generator)
        started, sums = time.perf_counter(), {}
        bar = progress(range(n_batches), f"train_decoder epoch {epoch + 1}/{config.epochs}", unit="batch")
        for b in bar:
            rows = order[b * config.batch_size:(b + 1) * config.batch_size]
            features = train_data.features[rows].to(device)
            output = decoder_output(model, features, f"at epoch {epoch + 1}, step {loop.step}")
            terms = loss_fn.terms(output, train_data.textures[rows].to(device),
                                  train_data.landmarks[rows].to(device), features, model.image_size)
            loop.update(terms["total"], epoch)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['total'] / (b + 1):.4f}")
        row = {"epoch": epoch + 1, "step": loop.step, **{f"train_{k}": v / n_batches for k, v in sums.items()},
               "val_loss": (evaluate_loss(model, val_data, loss_fn, device, config.batch_size)
                            if val_data is not None else math.nan),
               "seconds": time.perf_counter() - started}
        row["train_loss"] = row.pop("train_total")
        return row

    history = loop.run(one_epoch, (lambda row: on_epoch(row, model)) if on_epoch else None)
    return model.eval(), history


__all__ = ["DecoderConfig", "DecoderLoss", "IdentityNet", "train_decoder", "crops_to_tensor", "IDENTITY_NETS"]


# ------------------------------------------------------------------------- the stage

GRID_FACES = 6
METRICS_FILE, GRID_FILE = "train_decoder.json", "decoder_progress.png"


def identity_net_for(config: DecoderConfig, faces: FacesConfig) -> IdentityNet | None:
    """The frozen embedding network for the identity term; it must match the face features."""
    if config.identity_net == "none" or config.identity_weight == 0:
        return None
    wanted = {"dlib128": "dlib", "vggface4096": "vggface"}.get(faces.backend)
    check(config.identity_net == wanted, config.SECTION, "identity_net", config.identity_net,
          f"'{wanted}' for face features from faces.backend={faces.backend} (or 'none')")
    return IdentityNet(config.identity_net, faces.vggface_weights)


def run_train_decoder(config: DecoderConfig, faces_config: FacesConfig, paths: ProjectPaths) -> list[dict]:
    """The train_decoder stage: train on the train split's faces, keep the best validation
    epoch, write the model, its metrics and a picture of decoded faces, log the run to MLflow."""
    import mlflow

    keep_freed_memory()   # no page faults for each step's activations (speech2face.core.allocator)

    faces = load_faces(paths.faces)
    train, val = faces.subset("train"), faces.subset("val")
    if len(train) == 0:
        raise TrainingError("no training faces: run the faces stage first (dvc repro faces)")
    loss_fn = DecoderLoss(config.texture_weight, config.landmark_weight, config.identity_weight,
                          identity_net_for(config, faces_config))
    checkpoint = paths.checkpoints / "decoder" / "last.pt"
    fingerprint = hashlib.sha256((paths.faces / "index.csv").read_bytes()).hexdigest()[:16]
    # the checkpoint is only resumed for the same params, data and code
    shards.reset_if_config_changed(checkpoint.parent, {**vars(config), "data": fingerprint, "code": shards.code_fingerprint(
        sys.modules[__name__], loop_module, face_decoder, face_data, warp, network, chips)})
    # the same faces every epoch, so the grids show the decoder learning: validation faces
    # (not trained on) when there are any
    shown = (val if len(val) else train).take(list(range(min(GRID_FACES, len(val) or len(train)))))
    grid = paths.reports / GRID_FILE

    with tracking.start_run("train_decoder"):
        mlflow.log_params({"data.train_faces": len(train), "data.val_faces": len(val),
                           "data.feature_dim": faces.features.shape[1]})

        def log_epoch(row: dict, model) -> None:
            log_epoch_metrics(row)
            path = checkpoint.parent / "grids" / f"epoch_{row['epoch']:03d}.png"
            face_grid([shown.crops, decode(model, shown.features)[0]], path)
            mlflow.log_artifact(str(path), artifact_path="decoded_per_epoch")

        model, history = train_decoder(config, train, val, checkpoint, loss_fn, on_epoch=log_epoch)
        save_decoder(model, paths.decoder)
        face_grid([shown.crops, decode(model, shown.features)[0]], grid)
        kept, chosen = kept_epoch(history)
        final = {"train_loss": chosen["train_loss"], "val_loss": chosen["val_loss"], "best_epoch": kept,
                 "epochs": len(history), "train_faces": len(train),
                 **{k: v for k, v in chosen.items() if k.startswith("train_") and k != "train_loss"}}
        finish_run(paths.reports / METRICS_FILE, final,
                   [(grid, None), (paths.decoder, "model"), (paths.decoder.with_suffix(".json"), "model")])
    print(f"train_decoder: {len(history)} epochs on {len(train)} faces, kept epoch {kept} "
          f"(train_loss {final['train_loss']:.4f}, val_loss {final['val_loss']:.4f}); "
          f"top row true faces, bottom row decoded: {grid}", flush=True)
    return history
