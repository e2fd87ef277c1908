"""Run the whole benchmark suite: one JSON file and a printed table.

    .venv/bin/python benchmarks/run_all.py [--quick] [--out reports/benchmarks.json]
                                           [--only retrieval training ...] [--from-sample]

Sections (each module's docstring says what is measured and against what):
  preprocessing  bench_preprocess.py  clips/s of extract, spectrogram, faces with 1..N
                                      workers vs a naive per-clip loop (ffmpeg per clip and
                                      frame, librosa.stft, face_recognition per frame)
  spectrogram    bench_spectrogram.py clips/s of batched torch STFTs vs librosa per clip
  training       bench_training.py    full-size voice encoder: samples/s, peak memory,
                                      FLOP/s vs the device's timed matmul peak, bf16,
                                      torch.compile (GPU only), data-loader wait
  retrieval      bench_retrieval.py   exact R@K and top-k, 10,000 queries vs galleries of
                                      1e3..1e6, streamed vs naive full matrix

Every figure is a value and the baseline it is compared with, measured in the same run on
the same machine (benchlib.figure: ratio = value / baseline, ``better`` gives the
direction). The JSON also holds the machine (CPU model, cores, torch version, GPU name if
any, load average at the start and end), each section's raw measurements, what was skipped
and why, and the command line. It is rewritten after every section, so a crash keeps what
was measured; a section that fails is recorded with its error and the others still run.

``--quick`` (used by tests/test_benchmarks.py, under 3 minutes on 2 cores): 3 clips,
16 spectrograms, the full-size model at the shortest input its layers accept (259 frames)
for one step at batch 1, retrieval with 1,000 queries up to 1e4 items. The full run takes
about 10-15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ROOT, figure  # noqa: E402

SECTIONS = ("preprocessing", "spectrogram", "training", "retrieval")


def preprocessing(args) -> dict:
    import bench_preprocess

    # The pipeline on every sample clip (its worker start-up is paid once per stage, as at
    # scale); the naive loop, whose rate has no start-up part, on 32 of them.
    limit = args.limit or (3 if args.quick else None)
    workers = benchlib.worker_counts(benchlib.usable_cores())
    result = bench_preprocess.measure(limit, workers, args.from_sample, quiet=not args.verbose,
                                      naive_limit=3 if args.quick else 32)
    naive = result["runs"][result["baseline"]]["clips_per_second"]
    figures = []
    for name, run in result["runs"].items():
        if name == result["baseline"]:
            continue
        for step in (*bench_preprocess.STEPS, "total"):
            figures.append(figure(f"{step}, {name}", run["clips_per_second"][step], "clips/s",
                                  f"naive per-clip {step}", naive[step], "higher",
                                  f"{result['clips']} clips, naive on {result['naive_clips']}"
                                  + (", end to end" if step == "total" else "")))
    return {"figures": figures, "details": result, "skipped": []}


def spectrogram(args) -> dict:
    import bench_spectrogram

    threads = benchlib.usable_cores()
    result = (bench_spectrogram.measure(16, 8, threads, 1) if args.quick
              else bench_spectrogram.measure(128, 32, threads, 3))
    base = result["rates"][result["baseline"]]
    figures = [figure(name, rate, "clips/s", result["baseline"], base, "higher",
                      f"{result['settings']['clips']} clips of 6 s, {threads} torch threads")
               for name, rate in result["rates"].items() if name != result["baseline"]]
    return {"figures": figures, "details": result, "skipped": []}


def training(args) -> dict:
    import bench_training

    result = bench_training.measure(quick=args.quick)
    return {"figures": result.pop("figures"), "details": result, "skipped": result.pop("skipped")}


def retrieval(args) -> dict:
    import bench_retrieval

    result = bench_retrieval.measure(quick=args.quick)
    return {"figures": result.pop("figures"), "details": result, "skipped": result.pop("skipped")}


RUNNERS = {"preprocessing": preprocessing, "spectrogram": spectrogram, "training": training,
           "retrieval": retrieval}


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuple keys -> strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(_clean(report), indent=1) + "\n")
    tmp.replace(path)


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu_model']}, {m['usable_cores']}/{m['logical_cores']} cores, "
             f"{m['memory_total_gb']} GB, torch {m['torch']}, GPU {m['gpu'] or 'none'}; load average "
             f"{m['load_average_1_5_15']} at start, {m.get('load_average_end')} at end",
             f"command: {report['command']}"]
    for name, section in report["sections"].items():
        lines.append("")
        lines.append(f"== {name} ({section['status']}, {section['seconds']:.0f} s)")
        if section["status"] != "ok":
            lines.append(f"   error: {section['error']}")
            continue
        width = max((len(f["name"]) for f in section["figures"]), default=10)
        for f in section["figures"]:
            better = benchlib.improvement(f)
            verdict = (f"{better:.2f}x better" if better >= 1 else f"{1 / better:.2f}x worse")
            if f["note"].startswith(("ratio =", "cross-check")):
                verdict = f"ratio {f['ratio']:.3f}"
            lines.append(f"   {f['name']:<{width}}  {_format(f['value']):>10} {f['unit']:<9} vs "
                         f"{f['baseline']}: {_format(f['baseline_value'])}  -> {verdict}"
                         + (f"  [{f['note']}]" if f["note"] else ""))
        for skip in section.get("skipped", []):
            lines.append(f"   skipped: {skip['name']}: {skip['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (< 3 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks.json")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--limit", type=int, default=None, help="preprocessing: first N clips")
    parser.add_argument("--from-sample", action="store_true",
                        help="preprocessing: cut the clips from data/sample even when data/clips exists")
    parser.add_argument("--verbose", action="store_true", help="show the stages' own output")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # stages and params.yaml are relative to the project root
    started = time.perf_counter()
    report = {"schema": 1, "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None
              else " ".join(["run_all.py", *argv]),
              "quick": args.quick, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": benchlib.machine_info(), "sections": {}}
    for name in args.only:
        print(f"run_all: {name} ...", flush=True)
        section_start = time.perf_counter()
        load_before = list(os.getloadavg())
        try:
            section = {"status": "ok", **RUNNERS[name](args)}
        except Exception as error:  # recorded; the other sections still run
            section = {"status": "error", "error": repr(error)[:500],
                       "traceback": traceback.format_exc()[-3000:], "figures": [], "skipped": []}
        section.update({"seconds": time.perf_counter() - section_start, "load_average_before": load_before,
                        "load_average_after": list(os.getloadavg())})
        report["sections"][name] = section
        report["machine"]["load_average_end"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - started
        write_report(report, args.out)
        print(f"run_all: {name} {section['status']} in {section['seconds']:.0f} s", flush=True)
    print()
    print(table(report))
    print(f"\nrun_all: {report['seconds']:.0f} s; wrote {args.out}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1)
