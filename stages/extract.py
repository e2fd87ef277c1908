"""DVC stage extract: downloaded clips -> 16 kHz mono audio + face frames, in shards.

Logic: speech2face.data.extract (settings: its ExtractConfig, the ``extract`` section).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.extract import ExtractConfig, run_extract  # noqa: E402


def main() -> None:
    paths = project_paths()
    run_extract(paths.download_manifest, paths.clips, paths.extracted, load_config(ExtractConfig))


if __name__ == "__main__":
    run_stage("extract", main)
