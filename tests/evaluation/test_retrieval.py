"""R@K: the rank rule (ties count against the model) against an independent scipy
computation, degenerate predictions at or below chance, and the paper's sampled galleries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from speech2face.evaluation import retrieval

SCIPY = {"cosine": "cosine", "l2": "euclidean", "l1": "cityblock"}


def reference_ranks(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray, metric: str) -> np.ndarray:
    """Independent: float64 scipy distances; every other item at a distance <= the true
    item's counts (NaN distances count too)."""
    d = cdist(queries.astype(np.float64), gallery.astype(np.float64), SCIPY[metric])
    true = d[np.arange(len(d)), true_index][:, None]
    ahead = (d <= true) | np.isnan(d) | np.isnan(true)
    ahead[np.arange(len(d)), true_index] = False
    return ahead.sum(axis=1)


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_ranks_equal_reference_with_ties(metric: str) -> None:
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(300, 24)).astype(np.float32)
    gallery[150:200] = gallery[100:150]   # duplicated items: exact ties with the true item
    true_index = rng.integers(0, 300, size=120)
    queries = gallery[true_index] + 0.8 * rng.normal(size=(120, 24)).astype(np.float32)
    ranks = retrieval.true_ranks(queries, gallery, true_index, metric, query_chunk=17, gallery_chunk=41)
    expected = reference_ranks(queries, gallery, true_index, metric)
    assert np.array_equal(ranks, expected)
    duplicated = (true_index >= 100) & (true_index < 200)
    assert duplicated.any() and (ranks[duplicated] >= 1).all()  # the twin always ranks ahead
    recall = retrieval.recall_at_k(ranks, retrieval.PAPER_KS, len(gallery))
    assert recall[1] == pytest.approx(np.mean(expected == 0))
    assert list(recall) == [1, 2, 5, 10, 25, 50, 75, 100]


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_degenerate_predictions_never_beat_chance(metric: str) -> None:
    """NaN, all-zero and constant predictions: R@K at most chance (balanced queries: each of
    the 20 identities has 3 voices, so a constant that lands nearest one identity gets
    exactly 1/20 at R@1)."""
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(20, 16)).astype(np.float32)
    true_index = np.repeat(np.arange(20), 3)
    for name, queries in (("nan", np.full((60, 16), np.nan, np.float32)),
                          ("zero", np.zeros((60, 16), np.float32)),
                          ("constant", np.tile(rng.normal(size=16).astype(np.float32), (60, 1)))):
        ranks = retrieval.true_ranks(queries, gallery, true_index, metric)
        for k, value in retrieval.recall_at_k(ranks, (1, 2, 5, 10), 20).items():
            assert value <= retrieval.chance_recall(k, 20) + 1e-12, (name, k, value)
        hits = retrieval.sampled_gallery_hits(queries, gallery, true_index, 10, draws=3, seed=0, ks=(1, 5),
                                              metric=metric)
        for k, per_query in hits.items():
            assert per_query.mean() <= retrieval.chance_recall(k, 10) + 0.05, (name, k)
    # NaN and zero vectors tie with everything: the true face is last, R@1 = 0
    assert (retrieval.true_ranks(np.full((60, 16), np.nan, np.float32), gallery, true_index, metric) == 19).all()


def test_random_queries_sit_at_chance_and_sampled_galleries_are_seeded() -> None:
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(200, 16))
    queries = rng.normal(size=(2000, 16))
    true_index = rng.integers(0, 200, size=2000)
    recall = retrieval.recall_at_k(retrieval.true_ranks(queries, gallery, true_index), (10,), 200)
    assert abs(recall[10] - 10 / 200) < 0.02
    sampled = retrieval.sampled_gallery_hits(queries, gallery, true_index, 100, draws=5, seed=0, ks=(1, 10))
    assert abs(sampled[10].mean() - 0.10) < 0.03 and sampled[10].shape == (2000,)
    again = retrieval.sampled_gallery_hits(queries, gallery, true_index, 100, draws=5, seed=0, ks=(1, 10))
    assert all(np.array_equal(again[k], sampled[k]) for k in sampled)  # seeded


def test_sampled_galleries_equal_an_independent_draw() -> None:
    """Each query's random gallery: its true item plus gallery_size - 1 others; the rank in
    it counts the drawn items that are ahead. Reproduced here from the same generator."""
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    true_index = rng.integers(0, 30, size=50)
    queries = gallery[true_index] + rng.normal(size=(50, 8)).astype(np.float32)
    hits = retrieval.sampled_gallery_hits(queries, gallery, true_index, 10, draws=4, seed=7, ks=(1, 3))
    ahead = np.zeros((50, 30), bool)
    d = cdist(queries.astype(np.float64), gallery.astype(np.float64), "cosine")
    ahead = d <= d[np.arange(50), true_index][:, None]
    ahead[np.arange(50), true_index] = False
    expected = {1: np.zeros(50), 3: np.zeros(50)}
    for draw in range(4):
        keys = np.random.default_rng([7, draw, 0]).random((50, 30))
        keys[np.arange(50), true_index] = np.inf
        distractors = np.argpartition(keys, 8, axis=1)[:, :9]
        assert not (distractors == true_index[:, None]).any()
        rank = np.take_along_axis(ahead, distractors, axis=1).sum(axis=1)
        for k in expected:
            expected[k] += (rank < k) / 4
    for k in expected:
        assert np.allclose(hits[k], expected[k])


def test_top_k_and_feature_similarity() -> None:
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[0.9, 0.1, 0, 0], [0, 0, 0.2, 1.0]], dtype=np.float32)
    assert retrieval.top_k(queries, gallery, 2).tolist() == [[0, 1], [3, 2]]
    sim = retrieval.feature_similarity(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 1.0]]))
    assert sim["cosine_angle_deg"][0] == pytest.approx(45.0)
    assert sim["l1"][0] == pytest.approx(1.0)


def test_one_in_two_matching_is_the_share_of_impostors_beaten() -> None:
    """Against the exact expectation, counted by hand: a voice beats an impostor when its
    true face is strictly closer; over many seeded draws the share converges to the share
    of the other identities that are farther than the true one (ties are misses)."""
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((12, 8)).astype(np.float32)
    true_index = np.arange(24) % 12
    queries = gallery[true_index] + rng.standard_normal((24, 8)).astype(np.float32) * 1.2
    queries[0] = gallery[5]            # query 0 (true 0) equals identity 5: true is beaten by one
    queries[1] = gallery[1]            # query 1 is its own true face: beats every impostor
    gallery[11] = gallery[10]          # identity 10's twin: a tie for queries of 10 and 11
    queries[10] = queries[22] = gallery[10]
    cos = retrieval_cosine(queries, gallery)
    true_score = cos[np.arange(24), true_index]
    others = np.ones_like(cos, dtype=bool)
    others[np.arange(24), true_index] = False
    expected = np.array([(cos[i, others[i]] < true_score[i]).mean() for i in range(24)])

    draws = 4000
    accuracy = retrieval.one_in_two_matching(queries, gallery, true_index, draws=draws, seed=0)
    assert accuracy.shape == (24,)
    assert np.abs(accuracy - expected).max() < 4 * np.sqrt(0.25 / draws) + 1e-9
    assert accuracy[1] == 1.0 and expected[0] <= 10 / 11   # at least identity 5 beats it
    # the twin is a tie, a miss: 10 of 11 impostors are beaten (all 11 if a tie were a win)
    assert expected[10] == expected[22] == 10 / 11 and max(accuracy[10], accuracy[22]) < 0.95
    again = retrieval.one_in_two_matching(queries, gallery, true_index, draws=draws, seed=0)
    assert np.array_equal(accuracy, again)
    other_seed = retrieval.one_in_two_matching(queries, gallery, true_index, draws=50, seed=1)
    assert not np.array_equal(other_seed, retrieval.one_in_two_matching(queries, gallery, true_index, 50, 0))
    # random voices sit at chance (0.5)
    noise = rng.standard_normal((400, 8)).astype(np.float32)
    assert abs(retrieval.one_in_two_matching(noise, gallery, np.arange(400) % 12, 20, 0).mean() - 0.5) < 0.04
    with pytest.raises(ValueError, match="at least 2"):
        retrieval.one_in_two_matching(queries[:2], gallery[:1], np.zeros(2, int), 5, 0)


def retrieval_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 / np.linalg.norm(a64, axis=1, keepdims=True)) @ (b64 / np.linalg.norm(b64, axis=1, keepdims=True)).T
