"""95 % intervals for the evaluation's figures: a seeded bootstrap over test identities.

Test voices of one identity are not independent (same face, same voice), so the unit that
is resampled is the identity (a cluster bootstrap): each replicate draws as many identities
as there are, with replacement, and recomputes the figure as the mean over the drawn
identities' queries. The gallery stays the whole test split; only the queries are
resampled. A comparison of two models (or a model against chance) is **paired**: the
same replicates are applied to the per-query difference, so the interval of a difference
is not the difference of two intervals.

Everything is exact and machine-independent for a given seed: the replicate weights come
from numpy's seeded generator, and the weighted sums are plain numpy reductions (no BLAS,
whose summation order depends on the thread count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float   # the figure on the real test split (the mean over queries)
    low: float     # 2.5th percentile of the bootstrap replicates
    high: float    # 97.5th percentile

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self, digits: int = 6) -> dict[str, float]:
        return {"value": round(self.value, digits), "low": round(self.low, digits), "high": round(self.high, digits)}


class ClusterBootstrap:
    """Replicate weights drawn once, used for every figure of one evaluation."""

    def __init__(self, clusters: np.ndarray, replicates: int = 2000, seed: int = 0):
        names, self.cluster_of = np.unique(np.asarray(clusters), return_inverse=True)
        self.n_clusters = len(names)
        if self.n_clusters == 0:
            raise ValueError("no clusters to resample")
        rng = np.random.default_rng(seed)
        # (replicates, clusters): how often each identity is drawn in each replicate
        self.weights = rng.multinomial(self.n_clusters, np.full(self.n_clusters, 1.0 / self.n_clusters),
                                       size=replicates).astype(np.int64)
        self.queries_per_cluster = np.bincount(self.cluster_of, minlength=self.n_clusters)
        self._queries_drawn = (self.weights * self.queries_per_cluster).sum(axis=1)

    def interval(self, per_query: np.ndarray) -> Interval:
        """The mean of ``per_query`` over all queries, and its bootstrap interval."""
        values = np.asarray(per_query, dtype=np.float64)
        if values.shape != self.cluster_of.shape:
            raise ValueError(f"{values.shape[0]} values for {self.cluster_of.shape[0]} queries")
        if not np.isfinite(values).all():
            raise ValueError("non-finite per-query values")
        sums = np.bincount(self.cluster_of, weights=values, minlength=self.n_clusters)
        replicate_means = (self.weights * sums).sum(axis=1) / self._queries_drawn
        low, high = np.quantile(replicate_means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
        return Interval(float(values.mean()), float(low), float(high))

    def difference(self, a: np.ndarray, b: np.ndarray | float) -> Interval:
        """Paired: mean(a - b) and its interval (``b`` may be a constant, e.g. chance)."""
        return self.interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def verdict(difference: Interval, unit: str = "points", scale: float = 100.0) -> str:
    """Words for a paired difference: whether its interval excludes zero."""
    text = (f"{scale * difference.value:+.1f} {unit} (95 % interval {scale * difference.low:+.1f} to "
            f"{scale * difference.high:+.1f})")
    if difference.contains(0.0):
        return text + ": within noise, the interval contains 0"
    return text + (": a real difference, the interval excludes 0")
