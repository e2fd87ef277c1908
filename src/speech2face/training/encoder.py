"""Voice-encoder training: the data, the loss and one epoch; the loop is speech2face.training.loop.

Runs the same under ``python`` and ``torchrun --nproc_per_node N`` (DDP, gloo on CPU, nccl
on GPU); only rank 0 writes files and logs. bf16 autocast on CUDA. ``run_train_encoder`` is
the train_encoder stage: pairs of the train split, the frozen f_dec of the trained face
decoder in the loss, checkpoints that resume, the kept model and its figures in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from speech2face.core import shards, tracking
from speech2face.core.allocator import keep_freed_memory
from speech2face.core.determinism import fix_threads
from speech2face.core.params import setting
from speech2face.core.paths import ProjectPaths
from speech2face.core.reporting import progress
from speech2face.data import pairs as pairs_module
from speech2face.data.pairs import PairDataset, Pairs, load_pairs
from speech2face.models import losses as losses_module
from speech2face.models import voice_encoder as voice_encoder_module
from speech2face.models.encoder_io import save_encoder
from speech2face.models.losses import EncoderLoss
from speech2face.models.voice_encoder import INPUT_MODES, VoiceEncoder
from speech2face.training import loop as loop_module
from speech2face.training.loop import (Distributed, TrainingConfig, TrainingError, TrainingLoop, finish_run, kept_epoch,
                                       log_epoch_metrics, pick_device, setup_distributed)

METRICS_FILE = "train_encoder.json"


@dataclass(frozen=True, kw_only=True)
class EncoderConfig(TrainingConfig):
    SECTION: ClassVar[str] = "encoder"
    # the paper's Adam: beta1 0.5, eps 1e-4, lr x0.95 every 10k steps (epochs, batch_size, lr,
    # beta2, lr_decay_steps: TrainingConfig's); batch_size is per process
    beta1: float = setting(0.5, above=0)
    eps: float = setting(1e-4, above=0)
    lr_decay: float = setting(0.95, above=0)
    width: float = setting(0.125, above=0)             # channel multiplier; 1.0 = paper size (148 M parameters)
    lambda1: float = setting(0.025, minimum=0)         # normalised-L2 term
    lambda2: float = setting(200.0, minimum=0)         # distillation term (needs vggface4096's classifier)
    temperature: float = setting(2.0, above=0)
    fdec_weight: float = setting(1.0, minimum=0)       # L1 on f_dec, the frozen decoder's first layer (paper: 1)
    feature_l1_weight: float = setting(0.0, minimum=0)  # plain L1 on the features (not in the paper)
    loader_workers: int = setting(0, minimum=0)
    augment: int = setting(0, minimum=0)               # 1: random time roll of training spectrograms
    processes: int = setting(1, above=0)               # DDP processes under torchrun; batch_size is per process
    input_mode: str = setting("magnitude", choices=INPUT_MODES)   # complex: paper | magnitude: phase-free


def evaluate_loss(model, loader, loss_fn: EncoderLoss, device) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for spectrogram, feature in loader:
            predicted = model(spectrogram.to(device).float()).float()
            total += float(loss_fn.terms(feature.to(device), predicted)["total"]) * len(feature)
            count += len(feature)
    model.train()
    return total / max(count, 1)


def train_encoder(config: EncoderConfig, train: Pairs, val: Pairs | None, checkpoint: Path,
                  loss_fn: EncoderLoss, on_epoch: Callable[[dict], None] | None = None,
                  dist_info: Distributed | None = None) -> tuple[VoiceEncoder, list[dict]]:
    """Train (or resume); return the model of the best validation epoch (the last one
    without a validation split) and one history row per epoch."""
    dist_info = dist_info or Distributed()
    device = pick_device(dist_info.local_rank)
    fix_threads(config.threads)
    torch.manual_seed(config.seed)
    model = VoiceEncoder(out_dim=train.feature_dim, width=config.width, input_mode=config.input_mode)
    # Face features share a large common component (dlib embeddings of different people
    # have cosine ~0.9): start the output at the training mean so the network spends its
    # capacity on what tells faces apart.
    with torch.no_grad():
        model.fc[-1].bias.copy_(torch.as_tensor(train.features.mean(axis=0)))
    # channels-last (NHWC) weights: oneDNN's convolutions, backward above all, run about 1.6x
    # faster on CPU than in NCHW (benchmarks/bench_layout.py); the same math, other rounding
    model = model.to(device, memory_format=torch.channels_last)
    loop = TrainingLoop("train_encoder", model, config, checkpoint, device, dist_info.is_main)
    wrapped = model
    if dist_info.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = PairDataset(train, augment=bool(config.augment))
    # Each rank sees a disjoint slice of a shared permutation; batch_size is per process, so
    # the global batch is batch_size * world_size.
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=config.seed,
        drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                         num_workers=config.loader_workers, drop_last=len(dataset) > config.batch_size,
                                         pin_memory=device.type == "cuda")
    val_loader = (torch.utils.data.DataLoader(PairDataset(val), batch_size=config.batch_size)
                  if val is not None and len(val) else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def one_epoch(epoch: int) -> dict:
        sampler.set_epoch(epoch)
        started, data_wait, losses = time.perf_counter(), 0.0, []
        tick = time.perf_counter()
        bar = progress(loader, f"train_encoder epoch {epoch + 1}/{config.epochs}", unit="batch",
                       total=len(loader)) if dist_info.is_main else loader
        for spectrogram, feature in bar:
            data_wait += time.perf_counter() - tick
            spectrogram, feature = spectrogram.to(device, non_blocking=True).float(), feature.to(device)
            with autocast:
                predicted = wrapped(spectrogram)
            loss = loss_fn.terms(feature, predicted.float())["total"]
            loop.update(loss, epoch)
            losses.append(loss.item())
            if dist_info.is_main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            tick = time.perf_counter()
        train_loss = float(np.mean(losses)) if losses else math.nan
        if dist_info.world_size > 1:
            reduced = torch.tensor([train_loss], device=device)
            dist.all_reduce(reduced)
            train_loss = float(reduced) / dist_info.world_size
        return {"epoch": epoch + 1, "step": loop.step, "train_loss": train_loss,
                "val_loss": evaluate_loss(model, val_loader, loss_fn, device) if val_loader else math.nan,
                "lr": loop.schedule.get_last_lr()[0], "seconds": time.perf_counter() - started,
                "data_wait_seconds": data_wait}

    history = loop.run(one_epoch, on_epoch)
    return model, history


# ------------------------------------------------------------------------- the stage

def data_fingerprint(config: EncoderConfig, paths: ProjectPaths) -> str:
    digest = hashlib.sha256()
    for path in (paths.spectrograms / "index.csv", paths.faces / "index.csv"):
        digest.update(path.read_bytes())
    if config.fdec_weight and paths.decoder.exists():   # f_dec is part of the loss: a new decoder, a new objective
        digest.update(paths.decoder.read_bytes())
    return digest.hexdigest()[:16]


def frozen_decoder_head(decoder_path: Path, device: torch.device):
    """The decoder's shared layer f_dec, frozen, on the training device."""
    from speech2face.models.face_decoder import load_decoder

    decoder = load_decoder(decoder_path, device=device)
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder.f_dec


def run_train_encoder(config: EncoderConfig, paths: ProjectPaths) -> list[dict]:
    """The train_encoder stage: train on the train split's pairs, keep the best validation
    epoch, write the model and its metrics (rank 0), log the run to MLflow."""
    keep_freed_memory()   # no page faults for each step's activations (speech2face.core.allocator)
    dist_info = setup_distributed()
    pairs = load_pairs(paths.spectrograms, paths.faces)
    # The checkpoint persists across runs for resume; it is trusted only for the same params,
    # data and code (anything else starts over).
    checkpoint = paths.checkpoints / "encoder" / "last.pt"
    if dist_info.is_main:
        shards.reset_if_config_changed(checkpoint.parent, {
            **vars(config), "data": data_fingerprint(config, paths),
            "code": shards.code_fingerprint(sys.modules[__name__], loop_module, voice_encoder_module, losses_module,
                                            pairs_module)})
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    train, val = pairs.subset("train"), pairs.subset("val")
    if len(train) == 0:
        raise TrainingError("no training pairs: run the data stages first (dvc repro faces spectrogram)")
    # f_dec: the first layer of the trained face decoder (frozen), as in the paper. The face
    # classifier of the distillation term exists only with VGG-Face (faces.backend
    # vggface4096); without it that term is off (see README).
    head = (frozen_decoder_head(paths.decoder, pick_device(dist_info.local_rank)) if config.fdec_weight
            else None)
    loss_fn = EncoderLoss(fdec_weight=config.fdec_weight, lambda1=config.lambda1, lambda2=config.lambda2,
                          temperature=config.temperature, feature_l1_weight=config.feature_l1_weight,
                          decoder_head=head)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if not dist_info.is_main:
        _, history = train_encoder(config, train, val, checkpoint, loss_fn, dist_info=dist_info)
        return history

    import mlflow

    with tracking.start_run("train_encoder"):
        mlflow.log_params({"data.train_pairs": len(train), "data.val_pairs": len(val),
                           "data.feature_dim": pairs.feature_dim})
        model, history = train_encoder(config, train, val, checkpoint, loss_fn, on_epoch=log_epoch_metrics,
                                       dist_info=dist_info)
        settings = json.loads((paths.spectrograms / "config.json").read_text())
        save_encoder(model, paths.encoder, width=config.width,
                     spectrogram={k: v for k, v in settings.items() if k not in ("code", "dtype")})
        kept, chosen = kept_epoch(history)
        final = {"train_loss": chosen["train_loss"], "val_loss": chosen["val_loss"],
                 "best_epoch": kept, "epochs": len(history), "train_pairs": len(train)}
        finish_run(paths.reports / METRICS_FILE, final,
                   [(paths.encoder, "model"), (paths.encoder.with_suffix(".json"), "model")])
    print(f"train_encoder: {len(history)} epochs on {len(train)} pairs, kept epoch {final['best_epoch']} "
          f"(train_loss {final['train_loss']:.4f}, val_loss {final['val_loss']:.4f})", flush=True)
    return history
