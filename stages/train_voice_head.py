"""DVC stage train_voice_head: a pretrained GE2E speaker backbone + a trained head -> face features.

Logic: speech2face.training.voice_head (settings: its VoiceHeadConfig, the ``voice_head``
section; the loss weights are the ``encoder`` section's, so the voice encoder and the voice
head are trained on the same objective).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.training.encoder import EncoderConfig  # noqa: E402
from speech2face.training.voice_head import VoiceHeadConfig, run_train_voice_head  # noqa: E402


def main() -> None:
    run_train_voice_head(load_config(VoiceHeadConfig), load_config(EncoderConfig), project_paths())


if __name__ == "__main__":
    run_stage("train_voice_head", main)
