"""DVC stage speaker_embeddings: extracted audio -> one pretrained GE2E speaker embedding per clip.

Logic: speech2face.data.speaker_embeddings (settings: its SpeakerEmbeddingsConfig, the
``speaker_embeddings`` section).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.core.params import load_config  # noqa: E402
from speech2face.core.paths import project_paths  # noqa: E402
from speech2face.core.stage import run_stage  # noqa: E402
from speech2face.data.speaker_embeddings import SpeakerEmbeddingsConfig, run_speaker_embeddings  # noqa: E402


def main() -> None:
    paths = project_paths()
    run_speaker_embeddings(paths.extracted, paths.speaker_embeddings, load_config(SpeakerEmbeddingsConfig))


if __name__ == "__main__":
    run_stage("speaker_embeddings", main)
