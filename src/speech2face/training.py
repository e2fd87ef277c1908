"""Voice-encoder training: one loop, readable top to bottom.

Runs the same under ``python`` and ``torchrun --nproc_per_node N`` (DDP, gloo on CPU, nccl
on GPU); only rank 0 writes files and logs. bf16 autocast on CUDA. A checkpoint is written
after every epoch (atomically) and training resumes from it; a non-finite loss stops the
run with a clear error.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .determinism import fix_threads
from .fsutil import save_torch
from .losses import EncoderLoss
from .models import VoiceEncoder
from .pairs import PairDataset, Pairs
from .reporting import progress


class TrainingError(RuntimeError):
    pass


@dataclass
class EncoderConfig:
    width: float = 0.125
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    eps: float = 1e-4
    lr_decay: float = 0.95
    lr_decay_steps: int = 10000
    seed: int = 0
    lambda1: float = 0.025
    lambda2: float = 200.0
    temperature: float = 2.0
    fdec_weight: float = 1.0
    feature_l1_weight: float = 0.0
    loader_workers: int = 0
    augment: int = 1          # 1: random time roll of each training spectrogram
    input_mode: str = "complex"  # models.INPUT_MODES
    processes: int = 1        # DDP processes (dvc.yaml runs torchrun with this many)
    threads: int = 2          # torch/BLAS threads per process: fixed, so results do not depend on the machine


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """From torchrun's environment; a plain single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def make_optimizer(model: torch.nn.Module, config: EncoderConfig):
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                 eps=config.eps)
    # x lr_decay every lr_decay_steps steps (a staircase, as in the paper)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.lr_decay ** (step // config.lr_decay_steps))
    return optimizer, schedule


def save_checkpoint(path: Path, model, optimizer, schedule, epoch: int, step: int, history: list[dict]) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "epoch": torch.tensor(epoch), "step": torch.tensor(step),
        "history": {k: torch.tensor([h[k] for h in history], dtype=torch.float64) for k in (history[0] if history else {})},
        "rng": torch.get_rng_state(),
    }
    save_torch(state, path)


def load_checkpoint(path: Path, model, optimizer, schedule) -> tuple[int, int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    keys = list(state["history"])
    n = len(state["history"][keys[0]]) if keys else 0
    history = [{k: float(state["history"][k][i]) for k in keys} for i in range(n)]
    return int(state["epoch"]), int(state["step"]), history


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
    model = model.to(device)
    optimizer, schedule = make_optimizer(model, config)
    start_epoch, step, history = 0, 0, []
    best_path = checkpoint.with_name("best.pt")
    if checkpoint.exists():
        start_epoch, step, history = load_checkpoint(checkpoint, model, optimizer, schedule)
        if dist_info.is_main:
            print(f"train_encoder: resuming from {checkpoint} after epoch {start_epoch}", flush=True)
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

    for epoch in range(start_epoch, config.epochs):
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
            terms = loss_fn.terms(feature, predicted.float())
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}: "
                                    f"lower encoder.lr or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            if dist_info.is_main and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            tick = time.perf_counter()
        train_loss = float(np.mean(losses)) if losses else math.nan
        if dist_info.world_size > 1:
            reduced = torch.tensor([train_loss], device=device)
            dist.all_reduce(reduced)
            train_loss = float(reduced) / dist_info.world_size
        row = {"epoch": epoch + 1, "step": step, "train_loss": train_loss,
               "val_loss": evaluate_loss(model, val_loader, loss_fn, device) if val_loader else math.nan,
               "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - started,
               "data_wait_seconds": data_wait}
        history.append(row)
        if dist_info.is_main:
            # the best epoch on the validation split is the model we keep (early stopping
            # without stopping: later epochs still run and are logged)
            if best_epoch(history) == epoch + 1:
                save_torch(model.state_dict(), best_path)
            save_checkpoint(checkpoint, model, optimizer, schedule, epoch + 1, step, history)
            print(f"train_encoder: epoch {epoch + 1}/{config.epochs} train_loss {train_loss:.4f} "
                  f"val_loss {row['val_loss']:.4f} ({row['seconds']:.1f} s)", flush=True)
            if on_epoch:
                on_epoch(row)
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    return model, history


def best_epoch(history: list[dict]) -> int:
    """1-based epoch whose weights train_encoder returned (lowest validation loss)."""
    scored = [h for h in history if not math.isnan(h["val_loss"])]
    return int(min(scored, key=lambda h: h["val_loss"])["epoch"]) if scored else len(history)
