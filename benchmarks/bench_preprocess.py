"""Preprocessing throughput on the sample corpus: extract + spectrogram + faces, clips/s.

    .venv/bin/python benchmarks/bench_preprocess.py [--workers 1 2] [--limit N]

Network excluded: the clips come from the download stage's output (data/clips; the script
runs the download stage first when it is missing). Each worker count runs every stage from
scratch into a temp folder with the params.yaml settings. Ratios are against the 1-worker
run measured in the same invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "stages"))

import pandas as pd  # noqa: E402

from speech2face.extract import run_extract  # noqa: E402
from speech2face.params import load_section  # noqa: E402
from speech2face.tables import read_table, write_table  # noqa: E402


def ensure_clips() -> Path:
    manifest = ROOT / "data/manifests/download.csv"
    if not manifest.exists():
        import download

        os.chdir(ROOT)
        download.main()
    return manifest


def run_once(manifest: Path, workers: int, out: Path) -> dict[str, float]:
    import faces
    import spectrogram

    e, s, f = load_section("extract"), load_section("spectrogram"), load_section("faces")
    timings = {}
    started = time.perf_counter()
    run_extract(manifest, ROOT / "data/clips", out / "extracted", e["frames_per_clip"], e["sample_rate"],
                e["frame_max_side"], e["shard_size"], workers)
    timings["extract"] = time.perf_counter() - started
    started = time.perf_counter()
    spectrogram.run(out / "extracted", out / "spectrograms", s["seconds"], s["sample_rate"], s["window"], s["hop"],
                    s["n_fft"], s["power"], s["dtype"], s["batch_size"], workers)
    timings["spectrogram"] = time.perf_counter() - started
    started = time.perf_counter()
    faces.run(out / "extracted", out / "faces", f["detector"], f["upsample"], f["backend"], f["vggface_weights"],
              f["crop_size"], workers, f["split_fractions"], f["split_seed"], f["embed_frames"],
              f["detect_max_side"], f["max_centre_offset"])
    timings["faces"] = time.perf_counter() - started
    timings["total"] = sum(timings.values())
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--limit", type=int, default=None, help="first N downloaded clips only")
    args = parser.parse_args()
    os.chdir(ROOT)
    manifest = ensure_clips()
    table = read_table(manifest)
    ok = table[table["status"] == "ok"]
    if args.limit:
        ok = ok.head(args.limit)
    rows = []
    with tempfile.TemporaryDirectory(prefix="s2f-bench-") as tmp:
        subset = Path(tmp) / "download.csv"
        write_table(ok, subset)
        for workers in args.workers:
            timings = run_once(subset, workers, Path(tmp) / f"w{workers}")
            rows.append({"workers": workers, **{k: len(ok) / v for k, v in timings.items()}})
    result = pd.DataFrame(rows).set_index("workers")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(ok)} sample clips; clips/s per step (total = all three steps in sequence)")
    print(result.round(2).to_string())
    base = result.iloc[0]["total"]
    for workers, row in result.iterrows():
        print(f"workers={workers}: {row['total']:.2f} clips/s end to end, {row['total'] / base:.2f}x the "
              f"{result.index[0]}-worker run; slowest step: {row.drop('total').idxmin()}")


if __name__ == "__main__":
    main()
