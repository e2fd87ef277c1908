"""How well do voice embeddings separate speakers? A quick check on a folder of labelled speech.

    .venv/bin/python scripts/speaker_check.py [FOLDER] [--encoder models/voice_encoder.pt]

FOLDER holds one sub-folder per speaker with its recordings (LibriSpeech's layout; default
../shared/media/speech/librispeech: 10 speakers x 3 utterances). Each recording is decoded as
``speech2face predict`` decodes a voice (voice_to_face.load_voice) and embedded by:

- GE2E, the pretrained speaker encoder (resemblyzer 0.1.4's weights in
  speech2face.models.ge2e), on the recording preprocessed as GE2E expects;
- with ``--encoder``, the project's Table-1 voice encoder: its predicted face feature, computed
  as ``predict`` computes it (the training spectrogram settings, windows averaged).

Printed, per embedding: the share of recordings whose most similar other recording (cosine)
is by the same speaker, and the equal error rate of same/different-speaker verification over
all pairs (speech2face.evaluation.speaker_check), with their chance levels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import click  # noqa: E402
import numpy as np  # noqa: E402

from speech2face.cli import resolve_model, spectrogram_settings  # noqa: E402
from speech2face.core.errors import Speech2FaceError  # noqa: E402
from speech2face.evaluation.speaker_check import speaker_separation  # noqa: E402
from speech2face.models import ge2e  # noqa: E402
from speech2face.models.encoder_io import load_encoder  # noqa: E402
from speech2face.voice_to_face import encode_voice, load_voice  # noqa: E402

DEFAULT_FOLDER = ROOT.parent / "shared" / "media" / "speech" / "librispeech"
AUDIO_SUFFIXES = {".flac", ".wav", ".mp3", ".ogg", ".m4a"}


def recordings(folder: Path) -> tuple[list[Path], list[str]]:
    """(recordings, their speakers: the name of the sub-folder each is in), sorted."""
    paths = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in AUDIO_SUFFIXES)
    return paths, [p.parent.name for p in paths]


def ge2e_embeddings(paths: list[Path]) -> np.ndarray:
    model = ge2e.load_pretrained_ge2e()
    return np.stack([model.embed_utterance(ge2e.preprocess_wav(load_voice(p, ge2e.SAMPLE_RATE)))
                     for p in paths])


def encoder_features(paths: list[Path], encoder_location: str, max_windows: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as workdir:
        encoder_path = resolve_model(encoder_location, "encoder", Path(workdir))
        encoder = load_encoder(encoder_path)
        settings = spectrogram_settings(encoder_path)
    return np.stack([encode_voice(load_voice(p, settings.sample_rate), encoder, settings, max_windows)[0].numpy()
                     for p in paths])


def table(rows: dict[str, np.ndarray], speakers: list[str]) -> str:
    measures = {name: speaker_separation(embeddings, speakers) for name, embeddings in rows.items()}
    chance = next(iter(measures.values()))["nearest_chance"]
    lines = ["| embedding | dims | nearest other recording is the same speaker | EER (all pairs) |",
             "|---|---|---|---|",
             f"| chance | | {100 * chance:.1f} % | 50.0 % |"]
    for name, embeddings in rows.items():
        m = measures[name]
        lines.append(f"| {name} | {embeddings.shape[1]} | {100 * m['nearest_same_speaker']:.1f} % "
                     f"| {100 * m['eer']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                        help="one sub-folder of recordings per speaker")
    parser.add_argument("--encoder", help="a trained Table-1 voice encoder (path or MLflow URI) to check too")
    parser.add_argument("--max-windows", type=int, default=8, help="as speech2face predict's --max-windows")
    args = parser.parse_args(argv)
    paths, speakers = recordings(args.folder)
    if len(set(speakers)) < 2 or len(paths) == len(set(speakers)):
        raise SystemExit(f"speaker_check: {args.folder} needs >= 2 speaker folders and some speaker with "
                         f">= 2 recordings (found {len(paths)} recordings of {len(set(speakers))} speakers)")
    try:
        rows = {"GE2E (resemblyzer 0.1.4 weights)": ge2e_embeddings(paths)}
        if args.encoder:
            rows[f"Table-1 encoder {args.encoder}: predicted face feature"] = encoder_features(
                paths, args.encoder, args.max_windows)
    except (Speech2FaceError, click.ClickException, FileNotFoundError, RuntimeError) as error:
        # a missing or broken model file, an unreadable recording, resemblyzer not installed
        message = error.format_message() if isinstance(error, click.ClickException) else str(error)
        raise SystemExit(f"speaker_check: {message.splitlines()[0]}") from None
    print(f"{args.folder}: {len(paths)} recordings of {len(set(speakers))} speakers\n")
    print(table(rows, speakers))


if __name__ == "__main__":
    main()
