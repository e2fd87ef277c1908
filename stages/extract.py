"""DVC stage: downloaded clips -> 16 kHz mono audio + face frames (data/extracted/)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech2face.engine import EngineError, read_engine  # noqa: E402
from speech2face.extract import run_extract  # noqa: E402
from speech2face.params import ParamsError, get_int, load_section  # noqa: E402

SECTION = "extract"


def main() -> None:
    p = load_section(SECTION)
    engine, cluster_address = read_engine(p, SECTION)
    run_extract(
        download_manifest=Path("data/manifests/download.csv"),
        clips_dir=Path("data/clips"),
        out_dir=Path("data/extracted"),
        frames_per_clip=get_int(p, SECTION, "frames_per_clip", minimum=1),
        sample_rate=get_int(p, SECTION, "sample_rate", minimum=1000),
        frame_max_side=get_int(p, SECTION, "frame_max_side", minimum=64),
        shard_size=get_int(p, SECTION, "shard_size", minimum=1),
        workers=get_int(p, SECTION, "workers", minimum=1),
        engine=engine,
        cluster_address=cluster_address,
    )


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, EngineError) as error:
        sys.exit(f"extract: {error}")
