"""DVC stage: train the voice encoder on (spectrogram, face feature) pairs of the train split.

    python stages/train_encoder.py                       # one process
    torchrun --nproc_per_node 2 stages/train_encoder.py  # DDP; only rank 0 writes and logs

dvc.yaml runs it under torchrun with ``encoder.processes`` processes (GPUs on one machine;
gloo on a CPU). ``encoder.batch_size`` is per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from speech2face import losses as losses_module  # noqa: E402
from speech2face import models as models_module  # noqa: E402
from speech2face import pairs as pairs_module  # noqa: E402
from speech2face import shards, tracking  # noqa: E402
from speech2face import training as training_module  # noqa: E402
from speech2face.encoder_io import save_encoder  # noqa: E402
from speech2face.model_files import ModelFileError  # noqa: E402
from speech2face.losses import EncoderLoss  # noqa: E402
from speech2face.models import INPUT_MODES  # noqa: E402
from speech2face.pairs import load_pairs  # noqa: E402
from speech2face.params import ParamsError, check, dataclass_from_params, load_section  # noqa: E402
from speech2face.training import (EncoderConfig, TrainingError, best_epoch,  # noqa: E402
                                  setup_distributed, train_encoder)

SECTION = "encoder"
SPECTROGRAMS, FACES = Path("data/spectrograms"), Path("data/faces")
CHECKPOINT_DIR = Path("data/checkpoints/encoder")
MODEL, METRICS = Path("models/voice_encoder.pt"), Path("reports/train_encoder.json")
DECODER = Path("models/face_decoder.pt")


def read_config(p: dict) -> EncoderConfig:
    config = dataclass_from_params(EncoderConfig, SECTION, p, choices={"input_mode": INPUT_MODES},
                                   positive=("width", "epochs", "batch_size", "lr", "eps", "temperature",
                                             "lr_decay", "lr_decay_steps", "processes", "threads"))
    check(0 < config.beta1 < 1 and 0 < config.beta2 < 1, SECTION, "beta1", config.beta1, "in (0, 1)")
    return config


def data_fingerprint(config: EncoderConfig) -> str:
    digest = hashlib.sha256()
    for path in (SPECTROGRAMS / "index.csv", FACES / "index.csv"):
        digest.update(path.read_bytes())
    if config.fdec_weight and DECODER.exists():   # f_dec is part of the loss: a new decoder, a new objective
        digest.update(DECODER.read_bytes())
    return digest.hexdigest()[:16]


def frozen_decoder_head():
    """The decoder's shared layer f_dec, frozen, on the training device."""
    from speech2face.decoder import load_decoder
    from speech2face.training import pick_device

    decoder = load_decoder(DECODER, device=pick_device(int(os.environ.get("LOCAL_RANK", "0"))))
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder.f_dec


def run(config: EncoderConfig) -> list[dict]:
    dist_info = setup_distributed()
    pairs = load_pairs(SPECTROGRAMS, FACES)
    # The checkpoint persists across runs for resume; it is trusted only for the same params,
    # data and code (anything else starts over).
    checkpoint = CHECKPOINT_DIR / "last.pt"
    if dist_info.is_main:
        shards.reset_if_config_changed(CHECKPOINT_DIR, {
            **vars(config), "data": data_fingerprint(config),
            "code": shards.code_fingerprint(
                sys.modules[__name__], training_module, models_module, losses_module, pairs_module)})
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    train, val = pairs.subset("train"), pairs.subset("val")
    if len(train) == 0:
        raise TrainingError("no training pairs: run the data stages first (dvc repro faces spectrogram)")
    # f_dec: the first layer of the trained face decoder (frozen), as in the paper. The face
    # classifier of the distillation term exists only with VGG-Face (faces.backend
    # vggface4096); without it that term is off (see README).
    loss_fn = EncoderLoss(fdec_weight=config.fdec_weight, lambda1=config.lambda1, lambda2=config.lambda2,
                          temperature=config.temperature, feature_l1_weight=config.feature_l1_weight,
                          decoder_head=frozen_decoder_head() if config.fdec_weight else None)
    if not dist_info.is_main:
        model, history = train_encoder(config, train, val, checkpoint, loss_fn, dist_info=dist_info)
        return history

    import mlflow

    with tracking.start_run("train_encoder", {SECTION: vars(config)}):
        mlflow.log_params({"data.train_pairs": len(train), "data.val_pairs": len(val),
                           "data.feature_dim": pairs.feature_dim})

        def log_epoch(row: dict) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=row["epoch"])

        model, history = train_encoder(config, train, val, checkpoint, loss_fn, on_epoch=log_epoch,
                                       dist_info=dist_info)
        settings = json.loads((SPECTROGRAMS / "config.json").read_text())
        save_encoder(model, MODEL, width=config.width,
                     spectrogram={k: v for k, v in settings.items() if k not in ("code", "dtype")})
        kept = best_epoch(history)
        chosen = history[kept - 1]
        final = {"train_loss": chosen["train_loss"], "val_loss": chosen["val_loss"],
                 "best_epoch": kept, "epochs": len(history), "train_pairs": len(train)}
        METRICS.parent.mkdir(parents=True, exist_ok=True)
        METRICS.write_text(json.dumps(final, indent=2) + "\n")
        mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
        mlflow.log_artifact(str(MODEL), artifact_path="model")
        mlflow.log_artifact(str(MODEL.with_suffix(".json")), artifact_path="model")
    print(f"train_encoder: {len(history)} epochs on {len(train)} pairs, kept epoch {final['best_epoch']} "
          f"(train_loss {final['train_loss']:.4f}, val_loss {final['val_loss']:.4f})", flush=True)
    return history


def main() -> None:
    run(read_config(load_section(SECTION)))


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, TrainingError, ModelFileError) as error:
        sys.exit(f"train_encoder: {error}")
