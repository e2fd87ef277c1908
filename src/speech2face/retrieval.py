"""Voice -> face retrieval: exact recall at K, chunked so galleries can be huge.

R@K only needs the rank of the true item for each query: the number of gallery items
strictly closer than it. That is counted block by block (queries x gallery chunks), so the
full queries x gallery distance matrix never exists in memory, and no top-k sort is needed.

``true_ranks_streamed`` and ``top_k_streamed`` are the large-gallery versions (1e6 items
and more; benchmarks/bench_retrieval.py times them). They stream the gallery once, block
by block, in any float dtype (float16 storage halves the memory of a 4096-D gallery), and
work with a similarity score (larger = closer) that orders items exactly as the distance:
cosine -> q.g of unit vectors, l2 -> 2 q.g - |g|^2 (|q|^2 and the square root change no
order), so a block costs one matrix product. The comparison with the true item's score
writes 0/1 as float32 and a matrix-vector product with ones counts them: on a CPU that is
several times faster than summing a boolean tensor. Scores equal to within float32
rounding may order differently from ``pairwise_distance`` (1 - q.g rounds differently from
q.g); exact ties are handled exactly (see each function).
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


# ------------------------------------------------------------- streamed (large galleries)

def _float32_rows(array, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a numpy array (memory-mapped too) or tensor, as float32 on CPU.

    float16 storage is converted one block at a time, so only a block is ever float32.
    """
    block = array[start:stop]
    if isinstance(block, torch.Tensor):
        return block.detach().to(device="cpu", dtype=torch.float32)
    block = np.asarray(block)
    if block.dtype != np.float32 or not block.flags.writeable or not block.flags.c_contiguous:
        block = np.array(block, dtype=np.float32)  # a copy torch may own (read-only maps warn)
    return torch.from_numpy(block)


def _gather_rows(array, index: np.ndarray) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array[torch.as_tensor(index, dtype=torch.long)].detach().to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(array[index], dtype=np.float32).copy())


class _Scorer:
    """Similarity scores (larger = closer) of query rows against gallery blocks."""

    def __init__(self, metric: str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: expected one of {METRICS}")
        self.metric = metric

    def prepare_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(queries, dim=-1) if self.metric == "cosine" else queries

    def prepare_gallery(self, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows as used in the product, -|g|^2 for l2 else None)."""
        if self.metric == "cosine":
            return torch.nn.functional.normalize(gallery, dim=-1), None
        if self.metric == "l2":
            return gallery, -(gallery * gallery).sum(dim=-1)
        return gallery, None

    def block(self, q: torch.Tensor, g: torch.Tensor, neg_sq: torch.Tensor | None,
              out: torch.Tensor) -> torch.Tensor:
        """(len(q), len(g)) scores written into ``out``."""
        if self.metric == "cosine":
            return torch.mm(q, g.T, out=out)
        if self.metric == "l2":
            return torch.addmm(neg_sq, q, g.T, alpha=2.0, out=out)
        return torch.neg(torch.cdist(q, g, p=1.0), out=out)

    def paired(self, q: torch.Tensor, g: torch.Tensor, neg_sq: torch.Tensor | None) -> torch.Tensor:
        """Score of q[i] against g[i], shape (len(q),)."""
        if self.metric == "cosine":
            return (q * g).sum(dim=-1)
        if self.metric == "l2":
            return 2.0 * (q * g).sum(dim=-1) + neg_sq
        return -(q - g).abs().sum(dim=-1)


def _block_buffer(rows: int, cols: int) -> torch.Tensor:
    return torch.empty(rows * cols, dtype=torch.float32)


def true_ranks_streamed(queries, gallery, true_index: np.ndarray, metric: str = "cosine",
                        query_chunk: int = 4096, gallery_chunk: int = 4096) -> np.ndarray:
    """``true_ranks`` for large galleries: the 0-based rank of each query's true item.

    The rank is the number of gallery items scoring strictly closer than the true item, so
    exact ties count in the query's favour, and the true item itself never counts (its
    score in a block may differ in the last bit from its paired score). ``gallery`` may be
    a numpy array of any float dtype (memory-mapped too) or a tensor; it is read once, a
    block of ``gallery_chunk`` rows at a time. Peak memory beyond the inputs: the float32
    queries, one gallery block and one (query_chunk, gallery_chunk) float32 score block.
    """
    scorer = _Scorer(metric)
    true_index = np.asarray(true_index, dtype=np.int64)
    n_queries, n_gallery = len(queries), len(gallery)
    if len(true_index) != n_queries:
        raise ValueError(f"{n_queries} queries but {len(true_index)} true indices")
    if n_queries and (true_index.min() < 0 or true_index.max() >= n_gallery):
        raise ValueError(f"true_index outside the gallery of {n_gallery} items")
    ranks = torch.zeros(n_queries, dtype=torch.long)
    if n_queries == 0:
        return ranks.numpy()
    with torch.no_grad():
        q_all = scorer.prepare_queries(_float32_rows(queries))
        true_score = torch.empty(n_queries)
        for q0 in range(0, n_queries, query_chunk):  # true items a chunk at a time: little memory
            g_true, neg_sq_true = scorer.prepare_gallery(_gather_rows(gallery, true_index[q0:q0 + query_chunk]))
            true_score[q0:q0 + len(g_true)] = scorer.paired(q_all[q0:q0 + len(g_true)], g_true, neg_sq_true)
        del g_true, neg_sq_true
        true_t = torch.from_numpy(true_index)
        buffer = _block_buffer(min(query_chunk, n_queries), min(gallery_chunk, n_gallery))
        ones = torch.ones(min(gallery_chunk, n_gallery))
        for g0 in range(0, n_gallery, gallery_chunk):
            g, neg_sq = scorer.prepare_gallery(_float32_rows(gallery, g0, g0 + gallery_chunk))
            g_len = len(g)
            for q0 in range(0, n_queries, query_chunk):
                q = q_all[q0:q0 + query_chunk]
                block = buffer[:len(q) * g_len].view(len(q), g_len)
                scorer.block(q, g, neg_sq, block)
                # 1.0 where the item scores strictly closer than the true item, in place
                torch.gt(block, true_score[q0:q0 + len(q), None], out=block)
                local = true_t[q0:q0 + len(q)] - g0
                inside = torch.nonzero((local >= 0) & (local < g_len)).flatten()
                block[inside, local[inside]] = 0.0
                # float32 sums of 0/1 are exact below 2^24 items per block
                ranks[q0:q0 + len(q)] += torch.mv(block, ones[:g_len]).to(torch.long)
    return ranks.numpy()


def top_k_streamed(queries, gallery, k: int, metric: str = "cosine", query_chunk: int = 4096,
                   gallery_chunk: int = 16384) -> np.ndarray:
    """``top_k`` for large galleries: (n_queries, min(k, n_gallery)) gallery indices,
    nearest first; items with equal scores come in index order (lower index first), so the
    result is fully determined (``torch.topk`` leaves the order of ties open).

    The gallery is streamed once in blocks (any float dtype, memory-mapped too). Per query
    the best k so far are kept; in a block only items scoring strictly above the current
    k-th best can enter (an equal score loses the tie to the earlier, lower index), and
    those are few once the first blocks are seen, so most of a block costs one product and
    one comparison; only the queries with such items are merged. The first block (fewer
    than k items kept) takes the block's own best k, all items tied with its k-th best
    included. Wide gallery blocks mean few merges (each re-sorts the k kept items).
    """
    scorer = _Scorer(metric)
    n_queries, n_gallery = len(queries), len(gallery)
    k = min(int(k), n_gallery)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    best_score = torch.full((n_queries, k), -torch.inf)
    best_index = torch.full((n_queries, k), -1, dtype=torch.long)
    if n_queries == 0 or k == 0:
        return best_index.numpy()
    seen = 0
    with torch.no_grad():
        q_all = scorer.prepare_queries(_float32_rows(queries))
        buffer = _block_buffer(min(query_chunk, n_queries), min(gallery_chunk, n_gallery))
        mask_buffer = torch.empty(len(buffer), dtype=torch.bool)
        for g0 in range(0, n_gallery, gallery_chunk):
            g, neg_sq = scorer.prepare_gallery(_float32_rows(gallery, g0, g0 + gallery_chunk))
            g_len = len(g)
            for q0 in range(0, n_queries, query_chunk):
                q = q_all[q0:q0 + query_chunk]
                block = buffer[:len(q) * g_len].view(len(q), g_len)
                mask = mask_buffer[:len(q) * g_len].view(len(q), g_len)
                scorer.block(q, g, neg_sq, block)
                if seen < k:
                    # this block's own best k, with every item tied at its k-th score
                    kth = torch.topk(block, min(k, g_len), dim=1).values[:, -1:]
                    torch.ge(block, kth, out=mask)
                else:
                    torch.gt(block, best_score[q0:q0 + len(q), -1:], out=mask)
                hit_rows, hit_cols = torch.nonzero(mask, as_tuple=True)  # row-major: columns ascending
                if len(hit_rows) == 0:
                    continue
                counts = torch.bincount(hit_rows, minlength=len(q))
                active = torch.nonzero(counts).flatten()          # queries with new candidates
                starts = torch.cumsum(counts, 0) - counts
                slot = torch.arange(len(hit_rows)) - starts[hit_rows]
                position = torch.empty(len(q), dtype=torch.long)
                position[active] = torch.arange(len(active))
                width = int(counts.max())
                new_score = torch.full((len(active), width), -torch.inf)
                new_index = torch.full((len(active), width), -1, dtype=torch.long)
                new_score[position[hit_rows], slot] = block[hit_rows, hit_cols]
                new_index[position[hit_rows], slot] = hit_cols + g0
                # kept items (lower indices, ties already in index order) before the new ones
                # (columns ascending): a stable sort by score keeps equal scores in index order
                rows = active + q0
                score = torch.cat([best_score[rows], new_score], dim=1)
                index = torch.cat([best_index[rows], new_index], dim=1)
                order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
                best_score[rows] = torch.gather(score, 1, order)
                best_index[rows] = torch.gather(index, 1, order)
            seen += g_len
    return best_index.numpy()
