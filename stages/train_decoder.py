"""DVC stage train_decoder: face features -> face images (the face decoder), on the train split.

Logic: speech2face.training.decoder (settings: its DecoderConfig, the ``decoder`` section;
the ``faces`` section says which face features it decodes).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.faces import FacesConfig  # noqa: E402
from speech2face.training.decoder import DecoderConfig, run_train_decoder  # noqa: E402


def main() -> None:
    run_train_decoder(load_config(DecoderConfig), load_config(FacesConfig), project_paths())


if __name__ == "__main__":
    run_stage("train_decoder", main)
