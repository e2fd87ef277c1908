"""DVC stage train_encoder: spectrograms -> face features (the voice encoder), on the train split.

    python stages/train_encoder.py                       # one process
    torchrun --nproc_per_node 2 stages/train_encoder.py  # DDP; only rank 0 writes and logs

dvc.yaml runs it under torchrun with ``encoder.processes`` processes (GPUs on one machine;
gloo on a CPU). Logic: speech2face.training.encoder (settings: its EncoderConfig, the
``encoder`` section; ``encoder.batch_size`` is per process).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.training.encoder import EncoderConfig, run_train_encoder  # noqa: E402


def main() -> None:
    run_train_encoder(load_config(EncoderConfig), project_paths())


if __name__ == "__main__":
    run_stage("train_encoder", main)
