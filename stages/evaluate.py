"""DVC stage evaluate: voice -> face retrieval (R@K with intervals) and decoded faces, on the test split.

Logic: speech2face.evaluation.evaluate (settings: its EvaluateConfig, the ``evaluate``
section; ``spectrogram.power`` and the ``faces`` section describe the inputs).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.faces import FacesConfig  # noqa: E402
from speech2face.data.spectrogram import SpectrogramConfig  # noqa: E402
from speech2face.evaluation.evaluate import EvaluateConfig, run_evaluate  # noqa: E402


def main() -> None:
    run_evaluate(load_config(EvaluateConfig), load_config(SpectrogramConfig).power, load_config(FacesConfig),
                 project_paths())


if __name__ == "__main__":
    run_stage("evaluate", main)
