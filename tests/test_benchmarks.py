"""The benchmark suite end to end: ``benchmarks/run_all.py --quick`` into a temp folder.

One real run (about 1-2 minutes on 2 cores): the preprocessing clips are cut from
data/sample as in a clean clone (--from-sample), so the test does not depend on earlier
pipeline runs. Checks that every section ran and that the JSON holds what a reader needs:
the machine, positive values and baselines with ratio = value / baseline, the FLOP count
cross-check, and results that agree with their baselines.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("preprocessing", "spectrogram", "training", "retrieval")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks/run_all.py"), "--quick", "--from-sample",
                                "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "== retrieval (ok" in completed.stdout  # the printed table
    return json.loads(out.read_text())


def test_machine_and_every_section_with_positive_figures(report: dict) -> None:
    machine = report["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= 1 and machine["usable_cores"] >= 1
    assert machine["torch"] == torch.__version__
    assert machine["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert report["quick"] is True
    assert list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert section["figures"], name
        for fig in section["figures"]:
            assert fig["value"] > 0 and fig["baseline_value"] > 0, (name, fig)
            assert math.isfinite(fig["ratio"]) and fig["ratio"] > 0, (name, fig)
            assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline_value"], rel=1e-12)
            assert fig["better"] in ("higher", "lower") and fig["unit"] and fig["baseline"]


def test_preprocessing_compares_the_pipeline_with_the_naive_loop(report: dict) -> None:
    details = report["sections"]["preprocessing"]["details"]
    assert details["clips"] == 3 and "data/sample" in details["clip_source"]
    cores = report["machine"]["usable_cores"]
    expected = ["naive", "pipeline, 1 worker"] + [f"pipeline, {n} workers" for n in (2, 4, 8, 16, 32, 64) if n < cores]
    if cores > 1 and f"pipeline, {cores} workers" not in expected:
        expected.append(f"pipeline, {cores} workers")
    assert list(details["runs"]) == expected
    for run in details["runs"].values():
        seconds = run["seconds"]
        assert seconds["total"] == pytest.approx(seconds["extract"] + seconds["spectrogram"] + seconds["faces"])
        # the sample's speakers face the camera: both ways find the faces
        assert run["clips_with_face"] == 3
    names = [f["name"] for f in report["sections"]["preprocessing"]["figures"]]
    assert "total, pipeline, 1 worker" in names and "faces, pipeline, 1 worker" in names


def test_training_counts_flops_two_ways_and_records_what_it_skipped(report: dict) -> None:
    section = report["sections"]["training"]
    details = section["details"]
    assert details["fp32"]["parameters"] == 148_062_976  # the paper-size model
    # FlopCounterMode on the real step equals the analytic count of convs and linears exactly
    assert details["fp32"]["counted_flops_per_step"] == details["analytic_flops_per_step"]["total"]
    assert details["matmul_peak_flops"]["fp32"] > 0
    share = next(f for f in section["figures"] if f["name"] == "fp32 achieved FLOP/s")
    assert 0 < share["ratio"] < 1.5  # a share of the timed matmul peak
    memory = next(f for f in section["figures"] if "peak memory" in f["name"])
    assert memory["value"] > 0.9 * memory["baseline_value"]  # at least the weights, gradients, Adam state
    skipped = {s["name"]: s["reason"] for s in section["skipped"]}
    if not torch.cuda.is_available():
        assert "no GPU" in skipped["torch.compile"]
        assert details["bf16_conv_layer"]["bf16_autocast"]["seconds"] > 0


def test_retrieval_results_agree_with_their_baselines(report: dict) -> None:
    details = report["sections"]["retrieval"]["details"]
    sizes = {(row["dim"], row["gallery"]) for row in details["rows"]}
    assert sizes == {(128, 1000), (128, 10000), (4096, 1000)}
    for row in details["rows"]:
        assert row["storage"] == ("float16" if row["dim"] == 4096 else "float32")
        for baseline in ("naive", "naive_top_k"):
            if baseline in row:
                assert row[baseline]["agreement_with_streamed"]["differences_explained_by_float32_ties"], row
        assert set(row["recall"]) == {"1", "2", "5", "10", "25", "50", "75", "100"}
    assert details["target"]["gallery"] == 1_000_000 and details["target"]["met"] is None  # not run in quick mode
