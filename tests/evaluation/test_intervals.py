"""Bootstrap intervals over identities, paired differences, and the evaluation's refusal of
predictions without a direction."""

from __future__ import annotations

import numpy as np
import pytest

from speech2face.evaluation import metrics as evaluation
from speech2face.evaluation import retrieval
from speech2face.evaluation.intervals import ClusterBootstrap, verdict


def test_interval_equals_an_explicit_resampling() -> None:
    """Independent check: resample identities by hand with the same replicate weights."""
    rng = np.random.default_rng(0)
    clusters = np.repeat(["a", "b", "c", "d", "e"], [3, 1, 4, 2, 5])
    values = rng.random(len(clusters))
    boot = ClusterBootstrap(clusters, replicates=500, seed=3)
    names = np.unique(clusters)
    means = []
    for weights in boot.weights:
        drawn = np.concatenate([values[clusters == name] for name, w in zip(names, weights) for _ in range(w)])
        means.append(drawn.mean())
    low, high = np.quantile(means, [0.025, 0.975])
    interval = boot.interval(values)
    assert interval.value == pytest.approx(values.mean())
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert boot.weights.sum(axis=1).tolist() == [5] * 500   # each replicate draws 5 identities
    again = ClusterBootstrap(clusters, replicates=500, seed=3).interval(values)
    assert again == interval                                # seeded: the same bytes every time


def test_paired_difference_and_verdict() -> None:
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(30), 3)
    better = (rng.random(90) < 0.8).astype(float)
    worse = (rng.random(90) < 0.2).astype(float)
    boot = ClusterBootstrap(clusters, replicates=1000, seed=0)
    assert boot.difference(better, better).as_dict() == {"value": 0.0, "low": 0.0, "high": 0.0}
    clear = boot.difference(better, worse)
    assert clear.low > 0 and "a real difference" in verdict(clear)
    noisy = boot.difference(better, np.roll(better, 3))
    assert noisy.contains(0.0) and "within noise" in verdict(noisy)
    # against a constant (chance), the paired interval is the model's interval shifted
    shifted = boot.difference(better, 0.1)
    plain = boot.interval(better)
    assert (shifted.low, shifted.high) == pytest.approx((plain.low - 0.1, plain.high - 0.1))
    with pytest.raises(ValueError, match="non-finite"):
        boot.interval(np.full(90, np.nan))


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    """Coverage on simulated evaluations (clustered hits, known true rate 0.4)."""
    rng = np.random.default_rng(5)
    covered = 0
    for trial in range(200):
        identity_rate = np.clip(rng.normal(0.4, 0.15, size=40), 0, 1)
        clusters = np.repeat(np.arange(40), 3)
        hits = (rng.random(120) < identity_rate[clusters]).astype(float)
        covered += ClusterBootstrap(clusters, replicates=400, seed=trial).interval(hits).contains(0.4)
    assert 0.85 <= covered / 200 <= 0.99


@pytest.mark.parametrize("bad, kind", [(np.nan, "non-finite"), (np.inf, "non-finite"), (0.0, "zero-length")])
def test_predictions_without_direction_stop_the_evaluation(bad: float, kind: str) -> None:
    predicted = np.ones((6, 4), np.float32)
    predicted[[1, 4]] = bad
    with pytest.raises(evaluation.EvaluationError, match=rf"cnn: 2 of 6 predictions are {kind} \(clips c1, c4\)"):
        evaluation.check_predictions(predicted, [f"c{i}" for i in range(6)], "cnn")
    evaluation.check_predictions(np.ones((6, 4)), [f"c{i}" for i in range(6)], "cnn")  # fine: no error


def test_retrieval_hits_normalise_before_l1_and_l2() -> None:
    """Scaling a prediction changes nothing: its length carries no information."""
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(12, 8)).astype(np.float32)
    true_index = np.repeat(np.arange(12), 2)
    queries = gallery[true_index] + rng.normal(size=(24, 8)).astype(np.float32)
    scaled = queries * rng.uniform(0.01, 100, size=(24, 1)).astype(np.float32)
    a = evaluation.retrieval_hits(queries, gallery, true_index, (1, 5), sampled_gallery_size=100)
    b = evaluation.retrieval_hits(scaled, gallery, true_index, (1, 5), sampled_gallery_size=100)
    for metric in retrieval.METRICS:
        assert np.array_equal(a[metric]["rank"], b[metric]["rank"]), metric
    assert np.array_equal(a["l2"]["rank"], a["cosine"]["rank"])  # unit vectors: L2 orders as cosine


def test_paper_protocol_figures_only_where_the_test_split_is_large_enough() -> None:
    """The flat paper_R@K keys of metrics.json are the mean over queries of the random
    100-identity galleries' hits (the point estimate; the bootstrap gives the interval)."""
    from speech2face.evaluation.evaluate import paper_protocol_figures

    rng = np.random.default_rng(5)
    identities = np.repeat(np.arange(120), 3)
    gallery = rng.normal(size=(120, 16))
    queries = gallery[identities] + rng.normal(scale=1.5, size=(360, 16))
    boot = ClusterBootstrap(identities, replicates=200, seed=0)
    hits = {"cnn": evaluation.retrieval_hits(queries, gallery, identities, draws=3),
            "ridge": evaluation.retrieval_hits(rng.normal(size=(360, 16)), gallery, identities, draws=3)}
    figures = paper_protocol_figures({name: evaluation.with_intervals(h, boot) for name, h in hits.items()})
    assert set(figures) == {f"{prefix}paper_R@{k}{end}" for prefix in ("", "ridge_") for k in (1, 2, 5, 10)
                            for end in ("", "_low", "_high")}
    for prefix, name in (("", "cnn"), ("ridge_", "ridge")):
        for k in (1, 2, 5, 10):
            assert figures[f"{prefix}paper_R@{k}"] == pytest.approx(hits[name]["cosine"]["sampled"][k].mean(), abs=1e-6)
            assert figures[f"{prefix}paper_R@{k}_low"] <= figures[f"{prefix}paper_R@{k}"] <= \
                figures[f"{prefix}paper_R@{k}_high"]
    assert figures["paper_R@1"] > 0.2 and abs(figures["ridge_paper_R@10"] - 0.10) < 0.05   # signal vs chance
    small = {"cnn": evaluation.retrieval_hits(queries[:90], gallery[:30], identities[:90] % 30)}
    small_boot = ClusterBootstrap(identities[:90] % 30, replicates=200, seed=0)
    assert paper_protocol_figures({"cnn": evaluation.with_intervals(small["cnn"], small_boot)}) == {}   # 30 < 100
