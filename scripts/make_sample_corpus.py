"""Regenerate the embedded sample corpus data/sample/ (deterministic; a few minutes on 2 cores).

    .venv/bin/python scripts/make_sample_corpus.py

Needs espeak-ng, ffmpeg and the real portraits in ../shared/media/faces/ (see
data/sample/README.md). Writes data/sample/videos/*.mp4, avspeech_sample.csv,
avspeech_sample_test.csv, identities.csv and transcripts.csv; the README is hand-written and
left alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from speech2face.sample_corpus.corpus import DEFAULT_SEED, N_IDENTITIES, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "sample")
    parser.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "media" / "faces")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--identities", type=int, default=N_IDENTITIES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-undetectable", action="store_true",
                        help="leave out an identity whose face the HOG detector misses (large corpora) instead of "
                             "stopping")
    args = parser.parse_args()
    if not args.faces.is_dir():
        sys.exit(f"make_sample_corpus: portraits folder not found: {args.faces}")
    started = time.monotonic()
    summary = generate(args.out, args.faces, seed=args.seed, n_identities=args.identities,
                       workers=args.workers, strict=not args.skip_undetectable)
    print(f"make_sample_corpus: {summary['identities']} identities, {summary['rows'] - summary['bad_rows']} good rows, "
          f"{summary['bad_rows']} bad rows, {summary['dropped_identities']} identities left out (face not detected), "
          f"{summary['total_bytes'] / 1e6:.1f} MB in {args.out}, "
          f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
