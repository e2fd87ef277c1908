"""Voice -> face retrieval: exact recall at K, streamed so that galleries can be huge.

R@K only needs the rank of each query's true item: **the number of other gallery items at
least as close as the true item**. An item at the same distance as the true one (a tie)
ranks ahead of it, so ties count *against* the model: a degenerate model (all predictions
equal, all zero, or NaN) cannot score above chance by tying with everything. An item whose
similarity is NaN also counts as ahead. "The same distance" means within float32 rounding
of the true item's similarity (``tie_tolerance``): the true item's score is computed once
on its own and the others in matrix blocks, and the two roundings of one value may differ
in the last bits. That tolerance is about 1e-6 of the scores' scale, far below the gaps
between real faces; ties that are ties by construction (duplicated rows) are always caught.

There is one rank rule (``_Ranker.ahead``), used by ``true_ranks`` (whole gallery) and by
``sampled_gallery_hits`` (the paper's random 100-identity galleries). Both stream the
gallery in blocks (any float dtype, memory-mapped too): the queries x gallery matrix never
exists whole. Each metric is turned into a similarity (larger = closer) that orders items
exactly as the distance does, so a block costs one matrix product: cosine -> q.g of unit
vectors, l2 -> 2 q.g - |g|^2 (|q|^2 and the square root change no order), l1 -> -|q - g|_1.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("cosine", "l2", "l1")
PAPER_KS = (1, 2, 5, 10, 25, 50, 75, 100)
# Scores within this many float32 epsilons x sqrt(dim) x the pair's scale are ties.
_TIE_ULPS = 4.0
# Query rows per random-gallery draw: fixed, so that the draws never depend on memory settings.
_DRAW_CHUNK = 1024


def recall_at_k(ranks: np.ndarray, ks: tuple[int, ...], gallery_size: int) -> dict[int, float]:
    """{K: share of queries whose true item is in the top K} for K <= gallery_size."""
    return {k: float(np.mean(ranks < k)) for k in ks if k <= gallery_size}


def hits_at_k(ranks: np.ndarray, ks: tuple[int, ...], gallery_size: int) -> dict[int, np.ndarray]:
    """{K: per-query 0/1 (float64) whether the true item is in the top K}: the values that
    R@K averages, kept per query for bootstrap intervals."""
    return {k: (np.asarray(ranks) < k).astype(np.float64) for k in ks if k <= gallery_size}


def chance_recall(k: int, gallery_size: int) -> float:
    return min(1.0, k / gallery_size)


def feature_similarity_per_query(predicted: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Paper's feature similarity per query: cosine angle (degrees), L1 and L2 distance."""
    p = torch.as_tensor(np.asarray(predicted), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(true), dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(p, t, dim=-1).clamp(-1, 1)
    return {"cosine_angle_deg": torch.rad2deg(torch.arccos(cosine)).numpy(),
            "l1": (p - t).abs().sum(dim=-1).numpy(), "l2": (p - t).pow(2).sum(dim=-1).sqrt().numpy()}


def feature_similarity(predicted: np.ndarray, true: np.ndarray) -> dict[str, tuple[float, float]]:
    """(mean, std) of each ``feature_similarity_per_query`` measure."""
    return {name: (float(v.mean()), float(v.std())) for name, v in
            feature_similarity_per_query(predicted, true).items()}


# ------------------------------------------------------------------------------ internals

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

    def tie_tolerance(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per pair (q[i], g[i]): how far two roundings of a score of this size can be apart."""
        dim = q.shape[1]
        if self.metric == "cosine":        # unit vectors: scores in [-1, 1]
            scale = torch.ones(len(q))
        elif self.metric == "l2":          # 2 q.g - |g|^2
            scale = (q.norm(dim=-1) + g.norm(dim=-1)) ** 2
        else:                              # |q - g|_1
            scale = q.abs().sum(dim=-1) + g.abs().sum(dim=-1)
        return _TIE_ULPS * float(np.finfo(np.float32).eps) * max(dim, 1) ** 0.5 * scale


class _Ranker:
    """The one rank rule: for query rows and a gallery block, which items are *ahead* of
    the query's true item (at least as close, within rounding; NaN counts as ahead)."""

    def __init__(self, queries, gallery, true_index: np.ndarray, metric: str, query_chunk: int):
        self.scorer = _Scorer(metric)
        self.gallery = gallery
        self.true_index = np.asarray(true_index, dtype=np.int64)
        n_queries, n_gallery = len(queries), len(gallery)
        if len(self.true_index) != n_queries:
            raise ValueError(f"{n_queries} queries but {len(self.true_index)} true indices")
        if n_queries and (self.true_index.min() < 0 or self.true_index.max() >= n_gallery):
            raise ValueError(f"true_index outside the gallery of {n_gallery} items")
        self.queries = self.scorer.prepare_queries(_float32_rows(queries))
        # the bar each item must beat: true score minus the rounding tolerance
        self.threshold = torch.empty(n_queries)
        for q0 in range(0, n_queries, query_chunk):  # true items a chunk at a time: little memory
            q = self.queries[q0:q0 + query_chunk]
            raw_true = _gather_rows(gallery, self.true_index[q0:q0 + query_chunk])
            g_true, neg_sq = self.scorer.prepare_gallery(raw_true)
            true_score = self.scorer.paired(q, g_true, neg_sq)
            # NaN true score: nothing is "behind" it, every item counts as ahead
            self.threshold[q0:q0 + len(q)] = true_score - self.scorer.tie_tolerance(q, g_true)
        self.true_t = torch.from_numpy(self.true_index)

    def behind(self, q0: int, q1: int, g0: int, g: torch.Tensor, neg_sq, out: torch.Tensor) -> torch.Tensor:
        """float32 (q1 - q0, len(g)): 1.0 where the item is strictly behind the true item
        (score below threshold) or is the true item itself, else 0.0 (ahead or NaN)."""
        self.scorer.block(self.queries[q0:q1], g, neg_sq, out)
        torch.lt(out, self.threshold[q0:q1, None], out=out)
        local = self.true_t[q0:q1] - g0
        inside = torch.nonzero((local >= 0) & (local < len(g))).flatten()
        out[inside, local[inside]] = 1.0  # the true item is never ahead of itself
        return out


def _block_buffer(rows: int, cols: int) -> torch.Tensor:
    return torch.empty(max(rows * cols, 1), dtype=torch.float32)


# ------------------------------------------------------------------------------ public API

def true_ranks(queries, gallery, true_index: np.ndarray, metric: str = "cosine",
               query_chunk: int = 4096, gallery_chunk: int = 4096) -> np.ndarray:
    """0-based rank of each query's true gallery item: the number of other items at least
    as close (ties count against the model; see the module docstring).

    ``gallery`` may be a numpy array of any float dtype (memory-mapped too) or a tensor; it
    is read once, a block of ``gallery_chunk`` rows at a time. Peak memory beyond the
    inputs: the float32 queries, one gallery block and one (query_chunk, gallery_chunk)
    float32 block.
    """
    n_queries, n_gallery = len(queries), len(gallery)
    ranker = _Ranker(queries, gallery, true_index, metric, query_chunk)
    ranks = torch.zeros(n_queries, dtype=torch.long)
    if n_queries == 0:
        return ranks.numpy()
    with torch.no_grad():
        buffer = _block_buffer(min(query_chunk, n_queries), min(gallery_chunk, n_gallery))
        ones = torch.ones(min(gallery_chunk, n_gallery))
        for g0 in range(0, n_gallery, gallery_chunk):
            g, neg_sq = ranker.scorer.prepare_gallery(_float32_rows(gallery, g0, g0 + gallery_chunk))
            for q0 in range(0, n_queries, query_chunk):
                q1 = min(q0 + query_chunk, n_queries)
                block = buffer[:(q1 - q0) * len(g)].view(q1 - q0, len(g))
                behind = ranker.behind(q0, q1, g0, g, neg_sq, block)
                # float32 sums of 0/1 are exact below 2^24 items per block
                ranks[q0:q1] += len(g) - torch.mv(behind, ones[:len(g)]).to(torch.long)
    return ranks.numpy()


def sampled_gallery_hits(queries, gallery, true_index: np.ndarray, gallery_size: int, draws: int, seed: int,
                         ks: tuple[int, ...], metric: str = "cosine", gallery_chunk: int = 4096
                         ) -> dict[int, np.ndarray]:
    """The paper's protocol: for each query, ``draws`` random galleries of ``gallery_size``
    items that contain its true item; {K: per-query share of draws with the true item in the
    top K} (the mean over queries is R@K averaged over draws).

    Queries are handled ``_DRAW_CHUNK`` at a time: memory is that many rows x the gallery
    (as 0/1 bytes), never queries x gallery. Draw d of query chunk c uses the generator
    seeded with (seed, d, c), so results do not depend on anything but the inputs.
    """
    n_queries, n_items = len(queries), len(gallery)
    if gallery_size > n_items:
        raise ValueError(f"gallery of {gallery_size} needs at least that many items, have {n_items}")
    ks = tuple(k for k in ks if k <= gallery_size)
    hits = {k: np.zeros(n_queries) for k in ks}
    ranker = _Ranker(queries, gallery, true_index, metric, _DRAW_CHUNK)
    with torch.no_grad():
        for chunk, q0 in enumerate(range(0, n_queries, _DRAW_CHUNK)):
            q1 = min(q0 + _DRAW_CHUNK, n_queries)
            ahead = np.empty((q1 - q0, n_items), dtype=bool)
            for g0 in range(0, n_items, gallery_chunk):
                g, neg_sq = ranker.scorer.prepare_gallery(_float32_rows(gallery, g0, g0 + gallery_chunk))
                behind = ranker.behind(q0, q1, g0, g, neg_sq, _block_buffer(q1 - q0, len(g))[:(q1 - q0) * len(g)]
                                       .view(q1 - q0, len(g)))
                ahead[:, g0:g0 + len(g)] = (behind == 0).numpy()
            rows = np.arange(q1 - q0)
            for draw in range(draws):
                rng = np.random.default_rng([seed, draw, chunk])
                # distractors: the first gallery_size - 1 of a random order of the other items
                keys = rng.random((q1 - q0, n_items))
                keys[rows, ranker.true_index[q0:q1]] = np.inf
                distractors = np.argpartition(keys, gallery_size - 2, axis=1)[:, :gallery_size - 1] \
                    if gallery_size > 1 else np.zeros((q1 - q0, 0), dtype=np.int64)
                rank = np.take_along_axis(ahead, distractors, axis=1).sum(axis=1)
                for k in ks:
                    hits[k][q0:q1] += rank < k
    return {k: v / draws for k, v in hits.items()}


def one_in_two_matching(queries, gallery, true_index: np.ndarray, draws: int, seed: int,
                        metric: str = "cosine") -> np.ndarray:
    """1:2 matching (SVHF-Net, Learnable PINs, voice2face): given a voice and two faces, one of
    them the speaker's, pick the closer one. Per query, the share of ``draws`` seeded impostors
    (drawn among the other gallery items) for which the true item is strictly closer; chance
    is 0.5. It is the R@1 of a random 2-item gallery, so it shares the rank rule (a tie counts
    against the model) and the bounded memory of ``sampled_gallery_hits``."""
    if len(gallery) < 2:
        raise ValueError(f"1:2 matching needs at least 2 gallery items, have {len(gallery)}")
    return sampled_gallery_hits(queries, gallery, true_index, 2, draws, seed, (1,), metric)[1]


def top_k(queries, gallery, k: int, metric: str = "cosine", query_chunk: int = 4096,
          gallery_chunk: int = 16384) -> np.ndarray:
    """Nearest items per query (for pictures): (n_queries, min(k, n_gallery)) gallery indices,
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
