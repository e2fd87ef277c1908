"""Encoder training loop on small synthetic pairs: checkpoint/resume, best-epoch weights, NaN
stop. (That it learns is measured end to end: R@K of the pipeline smoke test and the sample.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from speech2face.models.encoder_io import load_encoder, save_encoder
from speech2face.models.losses import EncoderLoss
from speech2face.data.pairs import Pairs
from speech2face.training.encoder import EncoderConfig, train_encoder
from speech2face.training.loop import TrainingError, best_epoch

FRAMES = 300  # Table 1 needs at least 259 frames (2.6 s); 598 is the paper's 6 s


def synthetic_pairs(n: int = 16, dim: int = 8, seed: int = 0) -> Pairs:
    """Two 'voices' (low vs high band energy) mapped to two face features."""
    rng = np.random.default_rng(seed)
    spectra = rng.normal(0, 0.1, size=(n, FRAMES, 257, 2)).astype(np.float32)
    labels = np.arange(n) % 2
    spectra[labels == 0, :, 10:30, :] += 1.0
    spectra[labels == 1, :, 150:170, :] += 1.0
    faces = np.stack([np.eye(dim, dtype=np.float32)[0] + 0.5, np.eye(dim, dtype=np.float32)[1] + 0.5])
    table = pd.DataFrame({"clip_id": [f"c{i}" for i in range(n)], "identity": [f"id{i}" for i in range(n)],
                          "split": ["train"] * (n - 4) + ["val"] * 4, "spec_shard": "s", "spec_row": range(n)})
    return Pairs(table, {"s": spectra}, faces[labels])


def config(**overrides) -> EncoderConfig:
    base = dict(width=0.0625, epochs=3, batch_size=4, lr=3e-3, seed=0, feature_l1_weight=1.0, augment=1,
                input_mode="complex")
    return EncoderConfig(**{**base, **overrides})


def test_training_learns_and_resumes(tmp_path) -> None:
    torch.set_num_threads(2)
    pairs = synthetic_pairs()
    loss = EncoderLoss(lambda1=0.025, feature_l1_weight=1.0)
    checkpoint = tmp_path / "last.pt"
    model, history = train_encoder(config(epochs=2), pairs.subset("train"), pairs.subset("val"), checkpoint, loss)
    assert [h["epoch"] for h in history] == [1, 2] and checkpoint.exists()
    # resume: asking for 3 epochs runs only the third, continuing the step count
    model, history = train_encoder(config(epochs=3), pairs.subset("train"), pairs.subset("val"), checkpoint, loss)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[2]["step"] == 3 * history[0]["step"]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    # the returned weights are those of the best validation epoch
    kept = best_epoch(history)
    assert history[kept - 1]["val_loss"] == min(h["val_loss"] for h in history)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    model.eval()
    save_encoder(model, tmp_path / "enc.pt", width=0.0625)
    again = load_encoder(tmp_path / "enc.pt")
    with torch.no_grad():
        assert torch.allclose(again(torch.from_numpy(pairs.spectrograms["s"][:2])),
                              model(torch.from_numpy(pairs.spectrograms["s"][:2])), atol=1e-5)


def test_checkpoints_are_written_at_most_every_checkpoint_seconds(tmp_path) -> None:
    """Epochs shorter than checkpoint_seconds: one checkpoint, after the last epoch, holding
    the best epoch's weights; the weights are those of a run that checkpoints every epoch."""
    pairs = synthetic_pairs()
    loss = EncoderLoss(lambda1=0.025, feature_l1_weight=1.0)
    every, every_history = train_encoder(config(epochs=3, checkpoint_seconds=0), pairs.subset("train"),
                                         pairs.subset("val"), tmp_path / "every" / "last.pt", loss)
    checkpoint = tmp_path / "rare" / "last.pt"
    seen = []
    rare, rare_history = train_encoder(config(epochs=3, checkpoint_seconds=3600), pairs.subset("train"),
                                       pairs.subset("val"), checkpoint, loss,
                                       on_epoch=lambda row: seen.append((checkpoint.exists(),
                                                                         checkpoint.with_name("best.pt").exists())))
    assert seen == [(False, False), (False, False), (True, True)]
    assert torch.load(checkpoint, weights_only=True)["epoch"].item() == 3
    assert best_epoch(rare_history) < 3   # the kept weights were held in memory for an epoch, not the last ones
    assert [h["val_loss"] for h in rare_history] == [h["val_loss"] for h in every_history]
    best = torch.load(checkpoint.with_name("best.pt"), weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in every.state_dict().items())
    assert all(torch.equal(rare.state_dict()[k], v) for k, v in every.state_dict().items())


def test_nan_loss_stops_with_clear_error(tmp_path) -> None:
    pairs = synthetic_pairs()
    pairs.features[0] = np.nan
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_encoder(config(epochs=1), pairs.subset("train"), None, tmp_path / "last.pt", EncoderLoss())


def test_missing_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dvc repro train_encoder"):
        load_encoder(tmp_path / "nothing.pt")


def test_encoder_params_are_read_and_bad_values_are_one_line() -> None:
    from speech2face.core.params import ParamsError, build_config

    def read_config(section: dict) -> EncoderConfig:
        return build_config(EncoderConfig, section)

    config = read_config({"width": 1, "epochs": 3, "input_mode": "magnitude", "fdec_weight": 0})
    assert (config.width, config.epochs, config.input_mode, config.fdec_weight) == (1.0, 3, "magnitude", 0.0)
    assert isinstance(config.width, float) and isinstance(config.epochs, int)
    assert config.lr == EncoderConfig().lr   # absent keys keep the defaults
    bad = {
        "epochs": ({"epochs": 0}, "encoder.epochs = 0"),
        "fractional epochs": ({"epochs": 2.5}, "encoder.epochs = 2.5: expected an integer"),
        "input_mode": ({"input_mode": "phase"}, "encoder.input_mode = 'phase': expected one of"),
        "negative lr": ({"lr": -1e-3}, "encoder.lr = -0.001"),
        "beta1": ({"beta1": 1.0}, "encoder.beta1 = 1.0: expected in (0, 1)"),
        "unknown key": ({"widht": 0.5}, "encoder.widht = 0.5: expected a known key"),
        "bool": ({"augment": True}, "encoder.augment = True"),
    }
    for name, (section, message) in bad.items():
        with pytest.raises(ParamsError) as caught:
            read_config(section)
        assert message in str(caught.value) and "\n" not in str(caught.value), name


KILLABLE_TRAINING = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from pathlib import Path
from test_encoder_training import config, synthetic_pairs
from speech2face.models.losses import EncoderLoss
from speech2face.training.encoder import train_encoder
pairs = synthetic_pairs()
train_encoder(config(epochs=6, checkpoint_seconds=0), pairs.subset("train"), pairs.subset("val"), Path(sys.argv[2]),
              EncoderLoss(lambda1=0.025, feature_l1_weight=1.0))
"""


def test_killed_mid_way_training_resumes_to_the_same_weights(tmp_path) -> None:
    """kill -9 during epoch 2 or later: the rerun resumes from the last whole epoch (the
    checkpoint is written atomically) and ends with the weights and history of an
    uninterrupted run, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    pairs = synthetic_pairs()
    loss = EncoderLoss(lambda1=0.025, feature_l1_weight=1.0)
    model, history = train_encoder(config(epochs=6), pairs.subset("train"), pairs.subset("val"),
                                   tmp_path / "reference" / "last.pt", loss)

    checkpoint = tmp_path / "killed" / "last.pt"
    checkpoint.parent.mkdir()
    job = subprocess.Popen([sys.executable, "-c", KILLABLE_TRAINING, str(Path(__file__).parent), str(checkpoint)],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None and not checkpoint.exists():
        time.sleep(0.005)
    time.sleep(0.3)   # into the next epoch
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "training finished before it could be killed"
    done = torch.load(checkpoint, weights_only=True)["epoch"].item()
    assert 1 <= done < 6

    resumed, resumed_history = train_encoder(config(epochs=6), pairs.subset("train"), pairs.subset("val"),
                                             checkpoint, loss)
    assert len(resumed_history) == 6
    assert not [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".tmp-")]
    assert [{k: v for k, v in h.items() if "seconds" not in k} for h in resumed_history] == \
           [{k: v for k, v in h.items() if "seconds" not in k} for h in history]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())
