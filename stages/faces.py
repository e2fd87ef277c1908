"""DVC stage faces: extracted frames -> aligned face crops, landmarks, features and the splits.

Logic: speech2face.data.faces (settings: its FacesConfig, the ``faces`` section).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.faces import FacesConfig, run_faces  # noqa: E402


def main() -> None:
    paths = project_paths()
    run_faces(paths.extracted, paths.faces, load_config(FacesConfig))


if __name__ == "__main__":
    run_stage("faces", main)
