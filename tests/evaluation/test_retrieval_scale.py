"""The streamed (large-gallery) retrieval functions against the naive full-matrix computation.

Tie-heavy cases use data on which float32 arithmetic is exact, so a tie is a real tie and
the naive float64 reference and the streamed functions must agree exactly, whatever the
block sizes:
- cosine: vectors with exactly 16 entries of +-1 (the rest 0): every norm is 4, every
  normalised entry +-0.25 or 0, every dot product a multiple of 1/16;
- l2 and l1: small integer vectors.
Duplicated gallery rows and queries equal to gallery rows make many exact ties.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from speech2face.evaluation import retrieval

SCIPY = {"cosine": "cosine", "l2": "euclidean", "l1": "cityblock"}
CHUNKS = [(1, 17), (9, 1), (16, 13), (10_000, 10_000)]  # (query_chunk, gallery_chunk)


def exact_data(metric: str, n_gallery: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dim = 24
    if metric == "cosine":
        def rows(n: int) -> np.ndarray:
            out = np.zeros((n, dim), np.float32)
            for row in out:
                row[rng.choice(dim, 16, replace=False)] = rng.choice([-1.0, 1.0], 16)
            return out
    else:
        def rows(n: int) -> np.ndarray:
            return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    gallery = rows(n_gallery)
    gallery[n_gallery // 2:] = gallery[rng.integers(0, n_gallery // 2, n_gallery - n_gallery // 2)]  # duplicates
    queries = rows(n_queries)
    copied = rng.random(n_queries) < 0.3
    queries[copied] = gallery[rng.integers(0, n_gallery, copied.sum())]  # distance-0 ties
    return gallery, queries


def naive_distances(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """The full (queries, gallery) distance matrix in float64 (exact on exact_data)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return 1.0 - q @ g.T
    if metric == "l2":
        return np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    return np.abs(q[:, None, :] - g[None, :, :]).sum(-1)


def naive_ranks(distances: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """Items at least as close as the true item, the true item itself not counted (ties
    count against the model)."""
    true = distances[np.arange(len(distances)), true_index]
    return (distances <= true[:, None]).sum(axis=1) - 1


def naive_top_k(distances: np.ndarray, k: int) -> np.ndarray:
    """Nearest first, equal distances in index order."""
    columns = np.arange(distances.shape[1])
    return np.stack([np.lexsort((columns, row))[:k] for row in distances])


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_streamed_ranks_equal_naive_with_ties(metric: str) -> None:
    gallery, queries = exact_data(metric, 120, 90, seed=3)
    true_index = np.random.default_rng(4).integers(0, len(gallery), len(queries))
    d = naive_distances(queries, gallery, metric)
    expected = naive_ranks(d, true_index)
    # the data really is tie-heavy: many queries have items at exactly their true distance
    true = d[np.arange(len(d)), true_index]
    assert ((d == true[:, None]).sum(axis=1) > 1).mean() > 0.2
    for query_chunk, gallery_chunk in CHUNKS:
        ranks = retrieval.true_ranks(queries, gallery, true_index, metric, query_chunk, gallery_chunk)
        assert ranks.dtype == np.int64
        assert np.array_equal(ranks, expected), (query_chunk, gallery_chunk)


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_streamed_top_k_equal_naive_with_ties(metric: str) -> None:
    gallery, queries = exact_data(metric, 100, 40, seed=5)
    d = naive_distances(queries, gallery, metric)
    for k in (1, 6, 37, 250):
        expected = naive_top_k(d, min(k, len(gallery)))
        for query_chunk, gallery_chunk in CHUNKS:
            got = retrieval.top_k(queries, gallery, k, metric, query_chunk, gallery_chunk)
            assert got.shape == (len(queries), min(k, len(gallery)))
            assert np.array_equal(got, expected), (k, query_chunk, gallery_chunk)


@pytest.mark.parametrize("metric", retrieval.METRICS)
def test_streamed_functions_on_continuous_data_match_scipy(metric: str) -> None:
    rng = np.random.default_rng(6)
    gallery = rng.normal(size=(700, 32)).astype(np.float32)
    true_index = rng.integers(0, 700, size=300)
    queries = gallery[true_index] + 0.9 * rng.normal(size=(300, 32)).astype(np.float32)
    d = cdist(queries, gallery, SCIPY[metric])
    ranks = retrieval.true_ranks(queries, gallery, true_index, metric, query_chunk=64, gallery_chunk=97)
    assert np.array_equal(ranks, naive_ranks(d, true_index))
    top = retrieval.top_k(queries, gallery, 10, metric, query_chunk=64, gallery_chunk=97)
    assert np.array_equal(top, np.argsort(d, axis=1, kind="stable")[:, :10])


def test_float16_memory_mapped_gallery_and_torch_inputs(tmp_path) -> None:
    """A float16 gallery on disk is converted block by block: the same answer as its float32
    values in memory; tensors work as inputs too."""
    rng = np.random.default_rng(7)
    gallery16 = rng.normal(size=(500, 16)).astype(np.float16)
    np.save(tmp_path / "gallery.npy", gallery16)
    mapped = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    true_index = rng.integers(0, 500, size=200)
    queries = gallery16[true_index].astype(np.float32) + 0.5 * rng.normal(size=(200, 16)).astype(np.float32)
    d = cdist(queries, gallery16.astype(np.float32), "cosine")
    expected = naive_ranks(d, true_index)
    assert np.array_equal(retrieval.true_ranks(queries, mapped, true_index, gallery_chunk=128), expected)
    import torch

    assert np.array_equal(retrieval.true_ranks(torch.from_numpy(queries), torch.from_numpy(
        gallery16), true_index, gallery_chunk=128), expected)
    assert np.array_equal(retrieval.top_k(queries, mapped, 5, gallery_chunk=128),
                          np.argsort(d, axis=1, kind="stable")[:, :5])


def test_true_item_never_counts_and_bad_input_is_refused() -> None:
    gallery = np.eye(3, dtype=np.float32)
    queries = gallery.copy()
    # each query equals its true item and nothing else is as close: rank 0
    assert retrieval.true_ranks(queries, gallery, np.array([0, 1, 2])).tolist() == [0, 0, 0]
    # true item 1 for query 0: item 0 is strictly closer, item 2 is equally far (a tie,
    # which counts against the model): rank 2
    assert retrieval.true_ranks(queries[:1], gallery, np.array([1])).tolist() == [2]
    with pytest.raises(ValueError, match="outside the gallery"):
        retrieval.true_ranks(queries, gallery, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval.top_k(queries, gallery, 2, metric="dot")
    assert retrieval.top_k(queries[:0], gallery, 2).shape == (0, 2)
