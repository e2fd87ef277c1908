"""The training skeleton both networks plug into, readable top to bottom.

``TrainingLoop`` owns what the voice encoder and the face decoder train alike:

- Adam with a staircase learning-rate decay (x ``lr_decay`` every ``lr_decay_steps`` steps);
- ``update(loss)``: a non-finite loss stops the run with a clear error, else one optimiser
  and schedule step;
- after every epoch: the epoch's history row and the weights of the best validation epoch
  (early stopping without stopping, later epochs still run and are logged);
- a checkpoint (``last.pt``, written atomically: model, optimiser, schedule, step, history
  and the torch random state) from which an interrupted run resumes, with the best epoch's
  weights (``best.pt``, written first). It is written after the last epoch and after any
  epoch that ends ``checkpoint_seconds`` or more after the previous write: an interrupted
  run redoes at most that much training, to the same weights (the resumed epochs are
  deterministic), and short epochs do not spend their time writing (the sample's face
  decoder: 156 MB of weights and Adam state, 0.8 s a write, after epochs of 5 s);
- at the end the best epoch's weights are loaded back.

What differs stays with the network (speech2face.training.encoder / .decoder): the data,
the loss, and the body of one epoch (``epoch_fn``), which returns that epoch's row. Under
``torchrun`` only rank 0 (``is_main``) writes and prints. ``finish_run`` is the common end
of both stage runs: the kept epoch's figures to a metrics file and to MLflow.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from speech2face.core.errors import Speech2FaceError
from speech2face.core.fsutil import remove_stale_temps, save_torch
from speech2face.core.params import check, setting


class TrainingError(Speech2FaceError, RuntimeError):
    """Training cannot go on: no data, or the loss diverged."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The settings every training section has (the rest are the network's own)."""

    SECTION: ClassVar[str] = ""
    epochs: int = setting(8, above=0)
    batch_size: int = setting(8, above=0)
    lr: float = setting(1e-3, above=0)
    beta1: float = setting(0.9, above=0)
    beta2: float = setting(0.999, above=0)
    eps: float = setting(1e-8, above=0)
    lr_decay: float = setting(1.0, above=0)          # x lr_decay every lr_decay_steps steps
    lr_decay_steps: int = setting(10000, above=0)
    seed: int = setting(0, minimum=0)
    threads: int = setting(2, above=0)               # torch/BLAS threads: fixed, so the weights are the same anywhere
    checkpoint_seconds: float = setting(60.0, minimum=0)   # 0: a checkpoint after every epoch

    def check(self) -> None:
        check(0 < self.beta1 < 1 and 0 < self.beta2 < 1, self.SECTION, "beta1", self.beta1, "in (0, 1)")


# ------------------------------------------------------------------------ devices

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


# ------------------------------------------------------------------ optimiser, state

def make_optimizer(model: torch.nn.Module, config: TrainingConfig, parameter_groups: list[dict] | None = None):
    """Adam over ``model.parameters()``, or over ``parameter_groups`` (torch's groups: a group's
    own ``lr`` replaces ``config.lr``; the decay applies to every group)."""
    optimizer = torch.optim.Adam(model.parameters() if parameter_groups is None else parameter_groups, lr=config.lr,
                                 betas=(config.beta1, config.beta2), eps=config.eps)
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


def best_epoch(history: list[dict]) -> int:
    """1-based epoch whose weights the loop returns (lowest validation loss; the last
    epoch when there is no validation split)."""
    scored = [h for h in history if not math.isnan(h["val_loss"])]
    return int(min(scored, key=lambda h: h["val_loss"])["epoch"]) if scored else len(history)


# ---------------------------------------------------------------------- the loop

class TrainingLoop:
    def __init__(self, name: str, model: torch.nn.Module, config: TrainingConfig, checkpoint: Path,
                 device: torch.device, is_main: bool = True, parameter_groups: list[dict] | None = None):
        self.name, self.model, self.config, self.device, self.is_main = name, model, config, device, is_main
        self.checkpoint = Path(checkpoint)
        self.best_path = self.checkpoint.with_name("best.pt")
        self.optimizer, self.schedule = make_optimizer(model, config, parameter_groups)
        self.start_epoch, self.step, self.history = 0, 0, []
        if is_main:   # a checkpoint half written when a run was killed
            remove_stale_temps(self.checkpoint.parent)
        if self.checkpoint.exists():
            self.start_epoch, self.step, self.history = load_checkpoint(self.checkpoint, model, self.optimizer,
                                                                        self.schedule)
            if is_main:
                print(f"{name}: resuming from {self.checkpoint} after epoch {self.start_epoch}", flush=True)

    def update(self, loss: torch.Tensor, epoch: int) -> None:
        """One optimiser step on ``loss``; a non-finite loss stops the run."""
        if not torch.isfinite(loss):
            raise TrainingError(f"{self.name}: non-finite loss ({loss.item()}) at epoch {epoch + 1}, step "
                                f"{self.step}: lower {self.config.SECTION}.lr or check the inputs")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.step += 1

    def run(self, epoch_fn: Callable[[int], dict], on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """``epoch_fn(epoch)`` trains one epoch through ``update`` and returns its row (with
        ``train_loss``, ``val_loss`` and ``seconds``). Returns the history."""
        written = time.monotonic()
        unsaved_best = None   # the best epoch's weights, until the next checkpoint writes them
        for epoch in range(self.start_epoch, self.config.epochs):
            row = epoch_fn(epoch)
            self.history.append(row)
            if self.is_main:
                if best_epoch(self.history) == epoch + 1:
                    unsaved_best = copy.deepcopy(self.model.state_dict())
                if epoch + 1 == self.config.epochs or time.monotonic() - written >= self.config.checkpoint_seconds:
                    if unsaved_best is not None:
                        save_torch(unsaved_best, self.best_path)
                        unsaved_best = None
                    save_checkpoint(self.checkpoint, self.model, self.optimizer, self.schedule, epoch + 1,
                                    self.step, self.history)
                    written = time.monotonic()
                print(f"{self.name}: epoch {epoch + 1}/{self.config.epochs} train_loss {row['train_loss']:.4f} "
                      f"val_loss {row['val_loss']:.4f} ({row['seconds']:.1f} s)", flush=True)
                if on_epoch:
                    on_epoch(row)
        if self.best_path.exists():
            self.model.load_state_dict(torch.load(self.best_path, map_location=self.device, weights_only=True))
        return self.history


# ------------------------------------------------------------------- end of a run

def kept_epoch(history: list[dict]) -> tuple[int, dict]:
    kept = best_epoch(history)
    return kept, history[kept - 1]


def finish_run(metrics_path: Path, final: dict, artifacts: list[tuple[Path, str | None]]) -> None:
    """The kept epoch's figures to ``metrics_path`` (a DVC metrics file) and to MLflow as
    ``final_*``, and the run's files to MLflow (inside an active run)."""
    import mlflow

    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(final, indent=2) + "\n")
    mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
    for path, folder in artifacts:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_epoch_metrics(row: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=int(row["epoch"]))
