"""DVC stage spectrogram: extracted audio -> compressed STFTs, one shard per extract shard.

Logic: speech2face.data.spectrogram (settings: its SpectrogramConfig, the ``spectrogram`` section).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.spectrogram import SpectrogramConfig, run_spectrogram  # noqa: E402


def main() -> None:
    paths = project_paths()
    run_spectrogram(paths.extracted, paths.spectrograms, load_config(SpectrogramConfig))


if __name__ == "__main__":
    run_stage("spectrogram", main)
