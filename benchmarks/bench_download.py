"""Download stage: page/metadata requests per clip and clips/s, one resolution per video
(video jobs) against one resolution per row (the stage before them), in the same run.

    .venv/bin/python benchmarks/bench_download.py [--videos 6] [--segments 6] [--workers 4]

Two sources, each downloaded both ways into fresh temp folders:

- ``http``: the tests' local media server (tests/data/media_server.py: Range requests, a
  request log) serving ``videos`` copies of a 10 s video, ``segments`` segments of 1.5 s
  each, fetched with real yt-dlp (generic extractor) and ffmpeg. A page/metadata request is
  a GET without a Range header (yt-dlp's extraction); on YouTube each is a page and player
  API call, the requests its rate limits count.
- ``file``: the first ``videos`` videos of the embedded sample (data/sample), all their
  segments, read in place.

The baseline is ``download_rows(..., group_videos=False)``: every row its own job, so its
own resolution, which is what the stage did per row before video jobs (its file:// path
also copied the whole video per row first; that copy is gone from both runs here).

Then the stage's probe (a video's length before cutting, each clip's length after): the
ffprobe program, as the stage did before, against FFmpeg's libraries in this process
(``speech2face.data.media.probe``), over the same clips, with the same answer required.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))   # the tests' local media server

from media_server import make_test_video, serving  # noqa: E402

import ffmpeg  # noqa: E402

from speech2face.data.download import download_rows  # noqa: E402
from speech2face.data.media import INPUT_OPTIONS, probe  # noqa: E402


def _run(folder: Path, lines: list[str], template: str, root: Path, workers: int, grouped: bool) -> tuple[float, int]:
    """Seconds and ok clips of one download into ``folder``."""
    (folder / "rows.csv").write_text("".join(line + "\n" for line in lines))
    records: list[dict] = []
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        download_rows(folder / "rows.csv", folder / "clips", folder / "download.csv", template, root,
                      allow_file_urls=True, limit=None, workers=workers, retries=1, backoff_seconds=0.1,
                      timeout_seconds=10.0, min_seconds=1.0, on_record=records.append, group_videos=grouped)
    seconds = time.perf_counter() - started
    return seconds, sum(1 for r in records if r["status"] == "ok")


def bench_http(work: Path, videos: int, segments: int, workers: int) -> list[dict]:
    video = make_test_video(work / "video.mp4").read_bytes()
    lines = [f"vid{v},{1.5 * s:.1f},{1.5 * s + 1.5:.1f},0.5,0.5" for v in range(videos) for s in range(segments)]
    results = []
    with serving({f"vid{v}": video for v in range(videos)}) as server:
        for grouped in (False, True):
            server.log.clear()
            folder = work / f"http-{grouped}"
            folder.mkdir()
            seconds, ok = _run(folder, lines, server.template("v"), work, workers, grouped)
            metadata = sum(1 for _, method, _, has_range in server.log if method == "GET" and not has_range)
            results.append({"source": "http", "mode": "per video" if grouped else "per row", "clips": ok,
                            "metadata_requests": metadata, "seconds": seconds})
    return results


def bench_file(work: Path, videos: int, workers: int) -> list[dict]:
    sample = pd.read_csv(ROOT / "data/sample/avspeech_sample.csv", header=None, dtype=str, keep_default_na=False)
    chosen = list(dict.fromkeys(sample[0]))[:videos]
    lines = [",".join(row) for row in sample.itertuples(index=False) if row[0] in chosen]
    results = []
    for grouped in (False, True):
        folder = work / f"file-{grouped}"
        folder.mkdir()
        seconds, ok = _run(folder, lines, "file://{root}/data/sample/videos/{id}.mp4", ROOT, workers, grouped)
        results.append({"source": "file", "mode": "per video" if grouped else "per row", "clips": ok,
                        "metadata_requests": None, "seconds": seconds})
    return results


def bench_probe(videos: int) -> tuple[int, float, float]:
    """(files, seconds with the ffprobe program, seconds in process); the lengths must agree
    to the millisecond (ffprobe prints container lengths rounded to it)."""
    files = sorted((ROOT / "data/sample/videos").glob("*.mp4"))[:videos * 5]
    files = [f for f in files if f.stat().st_size > 100_000]   # the sample's corrupt stand-ins are small
    started = time.perf_counter()
    by_program = [float(ffmpeg.probe(str(f), **INPUT_OPTIONS)["format"]["duration"]) for f in files]
    program_seconds = time.perf_counter() - started
    started = time.perf_counter()
    in_process = [probe(f).duration for f in files]
    process_seconds = time.perf_counter() - started
    worst = max(abs(a - b) for a, b in zip(by_program, in_process))
    if worst > 0.0015:
        raise SystemExit(f"bench_download: the two probes disagree by {worst:.4f} s")
    return len(files), program_seconds, process_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--segments", type=int, default=6, help="segments per video (http)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        rows = bench_http(work, args.videos, args.segments, args.workers) + bench_file(work, args.videos, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'source':6} {'mode':9} {'clips':>5} {'requests/clip':>13} {'clips/s':>8} {'ratio':>6}")
    baseline: dict[str, float] = {}
    for row in rows:
        rate = row["clips"] / row["seconds"]
        baseline.setdefault(row["source"], rate)
        per_clip = f"{row['metadata_requests'] / row['clips']:.2f}" if row["metadata_requests"] is not None else "-"
        print(f"{row['source']:6} {row['mode']:9} {row['clips']:5d} {per_clip:>13} {rate:8.2f} "
              f"{rate / baseline[row['source']]:6.2f}")
    files, program_seconds, process_seconds = bench_probe(args.videos)
    print(f"probe: {1000 * program_seconds / files:.1f} ms per file with the ffprobe program, "
          f"{1000 * process_seconds / files:.1f} ms in process ({files} videos): "
          f"{program_seconds / process_seconds:.0f}x")


if __name__ == "__main__":
    main()
