"""DVC stage download: AVSpeech-format CSV -> exact segment clips + the download manifest.

Logic: speech2face.data.download (settings: its DownloadConfig, the ``download`` section).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.download import DownloadConfig, download_stage  # noqa: E402


def main() -> None:
    paths = project_paths()
    # DVC runs stages from the project root, so the URL template's {root} is the working directory.
    download_stage(load_config(DownloadConfig), paths.clips, paths.download_manifest, root=Path.cwd())


if __name__ == "__main__":
    run_stage("download", main)
