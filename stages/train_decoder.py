"""DVC stage: train the face decoder (face feature -> face image) on the train split's faces.

    python stages/train_decoder.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face import decoder, decoder_training, dlib_resnet, face_data, shards, tracking, warp  # noqa: E402
from speech2face.decoder import save_decoder  # noqa: E402
from speech2face.decoder_training import (IDENTITY_NETS, DecoderConfig, DecoderLoss, IdentityNet,  # noqa: E402
                                          decode, face_grid, train_decoder)
from speech2face.face_data import load_faces  # noqa: E402
from speech2face.params import ParamsError, check, dataclass_from_params, load_section  # noqa: E402
from speech2face.training import TrainingError, best_epoch  # noqa: E402

SECTION = "decoder"
FACES = Path("data/faces")
CHECKPOINT_DIR = Path("data/checkpoints/decoder")
MODEL, METRICS, GRID = Path("models/face_decoder.pt"), Path("reports/train_decoder.json"), Path(
    "reports/decoder_progress.png")
GRID_FACES = 6


def read_config(p: dict) -> DecoderConfig:
    config = dataclass_from_params(DecoderConfig, SECTION, p, choices={"identity_net": IDENTITY_NETS},
                                   positive=("width", "epochs", "batch_size", "lr", "eps", "lr_decay",
                                             "lr_decay_steps", "threads"))
    check(0 < config.beta1 < 1 and 0 < config.beta2 < 1, SECTION, "beta1", config.beta1, "in (0, 1)")
    return config


def identity_net_for(config: DecoderConfig, faces_params: dict) -> IdentityNet | None:
    """The frozen embedding network for the identity term; it must match the face features."""
    if config.identity_net == "none" or config.identity_weight == 0:
        return None
    backend = faces_params.get("backend", "dlib128")
    wanted = {"dlib128": "dlib", "vggface4096": "vggface"}.get(backend)
    check(config.identity_net == wanted, SECTION, "identity_net", config.identity_net,
          f"'{wanted}' for face features from faces.backend={backend} (or 'none')")
    return IdentityNet(config.identity_net, faces_params.get("vggface_weights"))


def run(config: DecoderConfig, faces_params: dict) -> list[dict]:
    import mlflow

    faces = load_faces(FACES)
    train, val = faces.subset("train"), faces.subset("val")
    if len(train) == 0:
        raise TrainingError("no training faces: run the faces stage first (dvc repro faces)")
    loss_fn = DecoderLoss(config.texture_weight, config.landmark_weight, config.identity_weight,
                          identity_net_for(config, faces_params))
    checkpoint = CHECKPOINT_DIR / "last.pt"
    fingerprint = hashlib.sha256((FACES / "index.csv").read_bytes()).hexdigest()[:16]
    # the checkpoint is only resumed for the same params, data and code
    shards.reset_if_config_changed(CHECKPOINT_DIR, {**vars(config), "data": fingerprint, "code": shards.code_fingerprint(
        sys.modules[__name__], decoder, decoder_training, face_data, warp, dlib_resnet)})
    # the same faces every epoch, so the grids show the decoder learning: validation faces
    # (not trained on) when there are any
    shown = (val if len(val) else train).take(list(range(min(GRID_FACES, len(val) or len(train)))))

    with tracking.start_run("train_decoder", {SECTION: vars(config)}):
        mlflow.log_params({"data.train_faces": len(train), "data.val_faces": len(val),
                           "data.feature_dim": faces.features.shape[1]})

        def log_epoch(row: dict, model) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=row["epoch"])
            path = CHECKPOINT_DIR / "grids" / f"epoch_{row['epoch']:03d}.png"
            face_grid([shown.crops, decode(model, shown.features)[0]], path)
            mlflow.log_artifact(str(path), artifact_path="decoded_per_epoch")

        model, history = train_decoder(config, train, val, checkpoint, loss_fn, on_epoch=log_epoch)
        save_decoder(model, MODEL)
        face_grid([shown.crops, decode(model, shown.features)[0]], GRID)
        kept = best_epoch(history)
        chosen = history[kept - 1]
        final = {"train_loss": chosen["train_loss"], "val_loss": chosen["val_loss"], "best_epoch": kept,
                 "epochs": len(history), "train_faces": len(train),
                 **{k: v for k, v in chosen.items() if k.startswith("train_") and k != "train_loss"}}
        METRICS.parent.mkdir(parents=True, exist_ok=True)
        METRICS.write_text(json.dumps(final, indent=2) + "\n")
        mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
        mlflow.log_artifact(str(GRID))
        mlflow.log_artifact(str(MODEL), artifact_path="model")
        mlflow.log_artifact(str(MODEL.with_suffix(".json")), artifact_path="model")
    print(f"train_decoder: {len(history)} epochs on {len(train)} faces, kept epoch {kept} "
          f"(train_loss {final['train_loss']:.4f}, val_loss {final['val_loss']:.4f}); "
          f"top row true faces, bottom row decoded: {GRID}", flush=True)
    return history


def main() -> None:
    run(read_config(load_section(SECTION)), load_section("faces"))


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, TrainingError, ValueError) as error:
        sys.exit(f"train_decoder: {error}")
