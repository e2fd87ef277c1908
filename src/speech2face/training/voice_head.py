"""Training the voice head: pretrained GE2E backbone + MLP -> face feature, with the encoder's loss.

The data are the voice encoder's pairs (the same train and validation clips: spectrogram and
face stages both usable), each clip's voice as GE2E's mel partials of its extracted audio
(speech2face.data.clip_voices). The loss is the voice encoder's (speech2face.models.losses:
f_dec L1 through the trained face decoder's frozen first layer, normalised L2, ...), with the
``encoder`` section's weights, so the two models differ only in what turns the voice into
a feature. The loop is speech2face.training.loop's: the best validation epoch is kept, an
interrupted run resumes from its checkpoint.

``freeze_backbone: true``: GE2E's weights stay as pretrained; each clip's utterance
embedding is then computed once, and an epoch trains the head on those (milliseconds).
``false``: the LSTM is fine-tuned too, at ``backbone_lr``, every batch through it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from speech2face.core import shards, tracking
from speech2face.core.allocator import keep_freed_memory
from speech2face.core.determinism import fix_threads
from speech2face.core.params import setting
from speech2face.core.paths import ProjectPaths
from speech2face.data import clip_voices
from speech2face.data.pairs import Pairs, load_pairs
from speech2face.models import ge2e
from speech2face.models import losses as losses_module
from speech2face.models import voice_head as voice_head_module
from speech2face.models.losses import EncoderLoss
from speech2face.models.voice_head import BACKBONES, PartialMels, VoiceHead, save_voice_head, utterance_embeddings
from speech2face.training import loop as loop_module
from speech2face.training.encoder import EncoderConfig, frozen_decoder_head
from speech2face.training.loop import (TrainingConfig, TrainingError, TrainingLoop, finish_run, kept_epoch,
                                       log_epoch_metrics)

METRICS_FILE = "train_voice_head.json"


@dataclass(frozen=True, kw_only=True)
class VoiceHeadConfig(TrainingConfig):
    SECTION: ClassVar[str] = "voice_head"
    backbone: str = setting("ge2e", choices=BACKBONES)
    freeze_backbone: bool = setting(True)        # false: fine-tune GE2E's LSTM with the head
    backbone_lr: float = setting(1e-4, above=0)  # the backbone's learning rate when fine-tuned
    hidden: int = setting(512, minimum=0)        # the head's hidden width; 0: one linear layer
    preprocess: bool = setting(True)             # resemblyzer's volume normalisation + VAD, as GE2E was trained
    epochs: int = setting(60, above=0)
    batch_size: int = setting(16, above=0)


def encoder_loss(encoder: EncoderConfig, decoder_path: Path) -> EncoderLoss:
    """The voice encoder's loss with the ``encoder`` section's weights (f_dec: the trained
    decoder's first layer, frozen)."""
    head = frozen_decoder_head(decoder_path, torch.device("cpu")) if encoder.fdec_weight else None
    return EncoderLoss(fdec_weight=encoder.fdec_weight, lambda1=encoder.lambda1, lambda2=encoder.lambda2,
                       temperature=encoder.temperature, feature_l1_weight=encoder.feature_l1_weight,
                       decoder_head=head)


def train_voice_head(config: VoiceHeadConfig, train_inputs: PartialMels, train_features: np.ndarray,
                     val_inputs: PartialMels | None, val_features: np.ndarray | None, checkpoint: Path,
                     loss_fn: EncoderLoss, on_epoch=None) -> tuple[VoiceHead, list[dict]]:
    """Train (or resume); return the model of the best validation epoch and the history."""
    fix_threads(config.threads)
    torch.manual_seed(config.seed)
    model = VoiceHead(out_dim=train_features.shape[1], hidden=config.hidden, freeze_backbone=config.freeze_backbone,
                      backbone=ge2e.load_pretrained_ge2e())
    # as the voice encoder: start the output at the training mean (face features share a
    # large common component), so the head learns what tells faces apart
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.as_tensor(train_features.mean(axis=0)))
    groups = [{"params": list(model.head.parameters())}]
    if not config.freeze_backbone:
        groups.append({"params": list(model.backbone.parameters()), "lr": config.backbone_lr})
    loop = TrainingLoop("train_voice_head", model, config, checkpoint, torch.device("cpu"), parameter_groups=groups)
    targets = torch.from_numpy(np.ascontiguousarray(train_features, dtype=np.float32))
    val_targets = None if val_features is None else torch.from_numpy(np.ascontiguousarray(val_features,
                                                                                          dtype=np.float32))
    # A frozen backbone gives each clip the same embedding every epoch: computed once.
    frozen = config.freeze_backbone
    train_embedded = utterance_embeddings(model, train_inputs) if frozen else None
    val_embedded = utterance_embeddings(model, val_inputs) if frozen and val_inputs is not None else None

    def predict(inputs: PartialMels, embedded: torch.Tensor | None, clips: np.ndarray) -> torch.Tensor:
        if embedded is not None:
            return model.head(embedded[torch.from_numpy(clips)])
        return model(*inputs.batch(clips))

    def val_loss() -> float:
        if val_inputs is None or not len(val_inputs):
            return math.nan
        model.eval()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val_inputs), 64):
                clips = np.arange(start, min(start + 64, len(val_inputs)))
                total += float(loss_fn.terms(val_targets[clips], predict(val_inputs, val_embedded, clips))["total"]
                               ) * len(clips)
        model.train()
        return total / len(val_inputs)

    def one_epoch(epoch: int) -> dict:
        started, losses = time.perf_counter(), []
        # a permutation of its own per epoch: a resumed run draws the same batches
        order = torch.randperm(len(train_inputs), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        for start in range(0, len(order), config.batch_size):
            clips = order[start:start + config.batch_size].numpy()
            loss = loss_fn.terms(targets[clips], predict(train_inputs, train_embedded, clips))["total"]
            loop.update(loss, epoch)
            losses.append(loss.item())
        return {"epoch": epoch + 1, "step": loop.step, "train_loss": float(np.mean(losses)), "val_loss": val_loss(),
                "lr": loop.schedule.get_last_lr()[0], "seconds": time.perf_counter() - started}

    model.train()
    history = loop.run(one_epoch, on_epoch)
    return model, history


# ------------------------------------------------------------------------- the stage

def data_fingerprint(paths: ProjectPaths) -> str:
    digest = hashlib.sha256()
    for path in (paths.spectrograms / "index.csv", paths.faces / "index.csv", paths.decoder):
        if path.exists():
            digest.update(path.read_bytes())
    for name, table in shards.list_shard_tables(paths.extracted):
        digest.update(name.encode() + table.to_csv(index=False).encode())
    return digest.hexdigest()[:16]


def split_inputs(pairs: Pairs, extract_dir: Path, preprocess: bool) -> PartialMels:
    return clip_voices.clip_partial_mels(extract_dir, list(pairs.table["clip_id"]), preprocess)


def run_train_voice_head(config: VoiceHeadConfig, encoder: EncoderConfig, paths: ProjectPaths) -> list[dict]:
    """The train_voice_head stage: the head (and, unless frozen, GE2E) on the train split's
    pairs, the best validation epoch kept, the model and its metrics written, the run in MLflow."""
    keep_freed_memory()
    fix_threads(config.threads)
    pairs = load_pairs(paths.spectrograms, paths.faces)
    train, val = pairs.subset("train"), pairs.subset("val")
    if len(train) == 0:
        raise TrainingError("no training pairs: run the data stages first (dvc repro faces spectrogram)")
    loss_settings = {k: getattr(encoder, k) for k in ("fdec_weight", "lambda1", "lambda2", "temperature",
                                                      "feature_l1_weight")}
    checkpoint = paths.checkpoints / "voice_head" / "last.pt"
    shards.reset_if_config_changed(checkpoint.parent, {
        **vars(config), "loss": loss_settings, "data": data_fingerprint(paths),
        "code": shards.code_fingerprint(sys.modules[__name__], loop_module, voice_head_module, losses_module, ge2e,
                                        clip_voices)})
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_inputs = split_inputs(train, paths.extracted, config.preprocess)
    val_inputs = split_inputs(val, paths.extracted, config.preprocess) if len(val) else None
    print(f"train_voice_head: {len(train_inputs.owner)} partials of {len(train)} training clips, "
          f"{0 if val_inputs is None else len(val_inputs.owner)} of {len(val)} validation clips "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    loss_fn = encoder_loss(encoder, paths.decoder)

    import mlflow

    with tracking.start_run("train_voice_head"):
        mlflow.log_params({"data.train_pairs": len(train), "data.val_pairs": len(val),
                           "data.feature_dim": pairs.feature_dim})
        model, history = train_voice_head(config, train_inputs, train.features, val_inputs,
                                          val.features if len(val) else None, checkpoint, loss_fn,
                                          on_epoch=log_epoch_metrics)
        save_voice_head(model, paths.voice_head, preprocess=config.preprocess)
        kept, chosen = kept_epoch(history)
        final = {"train_loss": chosen["train_loss"], "val_loss": chosen["val_loss"], "best_epoch": kept,
                 "epochs": len(history), "train_pairs": len(train)}
        finish_run(paths.reports / METRICS_FILE, final,
                   [(paths.voice_head, "model"), (paths.voice_head.with_suffix(".json"), "model")])
    print(f"train_voice_head: {len(history)} epochs on {len(train)} pairs "
          f"({'frozen' if config.freeze_backbone else 'fine-tuned'} GE2E), kept epoch {kept} "
          f"(train_loss {final['train_loss']:.4f}, val_loss {final['val_loss']:.4f})", flush=True)
    return history
