"""Voice -> face retrieval: exact recall at K, chunked so galleries can be huge.

R@K only needs the rank of the true item for each query: the number of gallery items
strictly closer than it. That is counted block by block (queries x gallery chunks), so the
full queries x gallery distance matrix never exists in memory, and no top-k sort is needed.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("cosine", "l2", "l1")
PAPER_KS = (1, 2, 5, 10, 25, 50, 75, 100)


def pairwise_distance(queries: torch.Tensor, gallery: torch.Tensor, metric: str) -> torch.Tensor:
    """(n_queries, n_gallery) distances; smaller is closer."""
    if metric == "cosine":
        q = torch.nn.functional.normalize(queries, dim=-1)
        g = torch.nn.functional.normalize(gallery, dim=-1)
        return 1.0 - q @ g.T
    if metric == "l2":
        return torch.cdist(queries, gallery, p=2.0, compute_mode="use_mm_for_euclid_dist")
    if metric == "l1":
        return torch.cdist(queries, gallery, p=1.0)
    raise ValueError(f"unknown metric {metric!r}: expected one of {METRICS}")


def true_ranks(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor,
               true_index: np.ndarray, metric: str = "cosine", query_chunk: int = 4096,
               gallery_chunk: int = 65536) -> np.ndarray:
    """0-based rank of each query's true gallery item (ties count in the query's favour)."""
    queries = torch.as_tensor(queries, dtype=torch.float32)
    gallery = torch.as_tensor(gallery, dtype=torch.float32)
    true_index = torch.as_tensor(true_index, dtype=torch.long)
    ranks = torch.zeros(len(queries), dtype=torch.long)
    with torch.no_grad():
        for q0 in range(0, len(queries), query_chunk):
            q = queries[q0:q0 + query_chunk]
            true_dist = pairwise_distance(q, gallery[true_index[q0:q0 + query_chunk]], metric).diagonal()
            q_true = true_index[q0:q0 + query_chunk]
            rows = torch.arange(len(q))
            for g0 in range(0, len(gallery), gallery_chunk):
                d = pairwise_distance(q, gallery[g0:g0 + gallery_chunk], metric)
                closer = d < true_dist[:, None]
                # the true item itself never counts (its two distance computations may differ
                # in the last bit)
                inside = (q_true >= g0) & (q_true < g0 + d.shape[1])
                closer[rows[inside], q_true[inside] - g0] = False
                ranks[q0:q0 + query_chunk] += closer.sum(dim=1)
    return ranks.numpy()


def recall_at_k(ranks: np.ndarray, ks: tuple[int, ...], gallery_size: int) -> dict[int, float]:
    """{K: share of queries whose true item is in the top K} for K <= gallery_size."""
    return {k: float(np.mean(ranks < k)) for k in ks if k <= gallery_size}


def sampled_gallery_recall(distances: np.ndarray, true_index: np.ndarray, gallery_size: int,
                           draws: int, seed: int, ks: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """The paper's protocol: for each query a random gallery of ``gallery_size`` items that
    contains its true item, R@K averaged over ``draws`` seeded draws: {K: (mean, std)}.

    ``distances`` is (n_queries, n_items); it is small here (items = test identities).
    """
    n_queries, n_items = distances.shape
    if gallery_size > n_items:
        raise ValueError(f"gallery of {gallery_size} needs at least that many items, have {n_items}")
    rng = np.random.default_rng(seed)
    true_dist = distances[np.arange(n_queries), true_index]
    per_draw = []
    for _ in range(draws):
        # random distractors: a random permutation of the other items per query, first g-1
        keys = rng.random((n_queries, n_items))
        keys[np.arange(n_queries), true_index] = np.inf  # never pick the true item as distractor
        distractors = np.argsort(keys, axis=1)[:, :gallery_size - 1]
        closer = (np.take_along_axis(distances, distractors, axis=1) < true_dist[:, None]).sum(axis=1)
        per_draw.append(recall_at_k(closer, ks, gallery_size))
    return {k: (float(np.mean([d[k] for d in per_draw])), float(np.std([d[k] for d in per_draw])))
            for k in per_draw[0]}


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, metric: str = "cosine",
          query_chunk: int = 1024) -> np.ndarray:
    """Indices of the k nearest gallery items per query, nearest first (for pictures)."""
    out = []
    with torch.no_grad():
        for q0 in range(0, len(queries), query_chunk):
            d = pairwise_distance(torch.as_tensor(queries[q0:q0 + query_chunk], dtype=torch.float32),
                                  torch.as_tensor(gallery, dtype=torch.float32), metric)
            out.append(torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def feature_similarity(predicted: np.ndarray, true: np.ndarray) -> dict[str, tuple[float, float]]:
    """Paper's feature similarity: cosine angle (degrees), L1 and L2 distance: (mean, std)."""
    p = torch.as_tensor(predicted, dtype=torch.float64)
    t = torch.as_tensor(true, dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(p, t, dim=-1).clamp(-1, 1)
    angle = torch.rad2deg(torch.arccos(cosine))
    l1 = (p - t).abs().sum(dim=-1)
    l2 = (p - t).pow(2).sum(dim=-1).sqrt()
    return {name: (float(v.mean()), float(v.std(unbiased=False)))
            for name, v in (("cosine_angle_deg", angle), ("l1", l1), ("l2", l2))}


def chance_recall(k: int, gallery_size: int) -> float:
    return min(1.0, k / gallery_size)
