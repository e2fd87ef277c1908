"""Exact retrieval at scale: R@K and top-k for 10,000 queries against 1e3..1e6 gallery items.

    .venv/bin/python benchmarks/bench_retrieval.py [--quick] [--queries 10000]

Random data, cosine metric: a gallery of unit-variance Gaussian vectors (128-D in float32;
4096-D stored as float16, which halves its memory), queries = their true gallery item +
Gaussian noise. Three ways of getting every query's rank (R@K follows from the ranks):

- ``naive``: the full (queries x gallery) cosine similarity matrix at once, then a count
  per row (the same rule: items at least as close). It is the baseline, run on as many
  queries as keep that matrix under ``naive_entries`` floats and ``naive_flops`` (the
  full 10,000-query matrix would take 40 GB at 1e6 items); the figures compare queries/s.
- ``streamed``: speech2face.evaluation.retrieval.true_ranks, always on all queries.

Top-k (k=100, for galleries of pictures): retrieval.top_k on all queries against the naive
full matrix + torch.topk on a query subset.
Each result is checked against the baseline's on the queries both ran: identical, or
differing only where items' similarities lie within float32 rounding of each other
(and true_ranks counts scores within float32 rounding of the true one as ties).

Peak memory is what each call adds to the process's resident set (benchlib.PeakMemory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import PeakMemory, figure  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from speech2face.evaluation import retrieval  # noqa: E402

TARGET = {"queries": 10_000, "gallery": 1_000_000, "dim": 128, "seconds": 60.0}
K_TOP = 100
# query = true item + NOISE x unit Gaussian: cosine ~0.3 with the true item, so that R@1 at
# 1e4..1e6 128-D items is far from 0 and from 1 (timings do not depend on it)
NOISE = 3.0

FULL = {"queries": 10_000, "sizes": {128: [1_000, 10_000, 100_000, 1_000_000], 4096: [1_000, 10_000, 100_000]},
        "top_k_sizes": {128: [1_000, 10_000, 100_000, 1_000_000]},
        "naive_entries": 2.5e8, "naive_flops": 1e12}
QUICK = {"queries": 1_000, "sizes": {128: [1_000, 10_000], 4096: [1_000]}, "top_k_sizes": {128: [10_000]},
         "naive_entries": 2.5e7, "naive_flops": 1e11}
STORAGE = {128: np.float32, 4096: np.float16}
STOPPED_4096 = ("4096-D stops at 1e5 items: 1e6 x 4096 fits in memory only as float16 (8 GB of this machine's RAM; "
                "float32 would be 16 GB), and 10,000 queries against it are 8.2e13 FLOP, over 10 minutes at this "
                "CPU's matrix-product peak; time grows linearly in the gallery size from the 1e5 figure")


def make_data(n_gallery: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery in its storage dtype, float32 queries, true index of each query)."""
    generator = torch.Generator().manual_seed(seed)
    gallery = np.empty((n_gallery, dim), dtype=STORAGE[dim])
    for start in range(0, n_gallery, 65536):  # in blocks: no float32 copy of a float16 gallery
        stop = min(start + 65536, n_gallery)
        gallery[start:stop] = torch.randn(stop - start, dim, generator=generator).numpy()
    true_index = torch.randint(0, n_gallery, (n_queries,), generator=generator).numpy()
    queries = (gallery[true_index].astype(np.float32)
               + NOISE * torch.randn(n_queries, dim, generator=generator).numpy())
    return gallery, queries, true_index


def naive_similarity(queries: np.ndarray, gallery: np.ndarray) -> torch.Tensor:
    """The whole (queries x gallery) cosine similarity matrix in memory at once."""
    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=-1)
    g = torch.nn.functional.normalize(torch.from_numpy(gallery.astype(np.float32)), dim=-1)
    return q @ g.T


def naive_ranks(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """The full matrix, then per row the other items at least as similar as the true one."""
    with torch.no_grad():
        s = naive_similarity(queries, gallery)
        true = s[torch.arange(len(s)), torch.as_tensor(true_index)]
        return ((s >= true[:, None]).sum(dim=1) - 1).numpy()


def naive_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    with torch.no_grad():
        return torch.topk(naive_similarity(queries, gallery), k, dim=1).indices.numpy()


def _unit64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rounding_tolerance(dim: int) -> float:
    """How far apart two cosine similarities of float32 unit vectors can be and still swap
    order in float32 arithmetic: the dot product's rounding error is at most about
    dim x float32 epsilon."""
    return dim * float(np.finfo(np.float32).eps)


def compare_ranks(reference: np.ndarray, streamed: np.ndarray, queries: np.ndarray, gallery: np.ndarray,
                  true_index: np.ndarray) -> dict:
    """Identical ranks, or differences that near-ties explain: a query whose rank differs by
    d must have at least d other items within float32 rounding of its true item's
    similarity (checked in float64)."""
    differing = np.flatnonzero(reference != streamed)
    explained = True
    tol = rounding_tolerance(gallery.shape[1])
    for i in differing:
        s = _unit64(gallery) @ _unit64(queries[i])
        near = np.abs(s - s[true_index[i]]) < tol
        near[true_index[i]] = False
        explained &= bool(near.sum() >= abs(int(reference[i]) - int(streamed[i])))
    return {"identical": len(differing) == 0, "queries_differing": int(len(differing)),
            "differences_explained_by_float32_ties": explained}


def compare_top_k(reference: np.ndarray, streamed: np.ndarray, queries: np.ndarray, gallery: np.ndarray) -> dict:
    """Identical lists, or lists that differ only where two items' similarities lie within
    float32 rounding of each other (checked in float64)."""
    rows, cols = np.nonzero(reference != streamed)
    tol = rounding_tolerance(gallery.shape[1])
    gaps = [abs(float(_unit64(queries[i]) @ _unit64(gallery[reference[i, j]]))
                - float(_unit64(queries[i]) @ _unit64(gallery[streamed[i, j]]))) for i, j in zip(rows, cols)]
    return {"identical": len(rows) == 0, "positions_differing": int(len(rows)),
            "differences_explained_by_float32_ties": all(g < tol for g in gaps)}


def measured(fn, repeat_below: float = 0.5) -> dict:
    """Seconds (best of up to 3 runs when one is short), peak memory of the first run, result."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    runs = 1
    while seconds < repeat_below and runs < 3:
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
        runs += 1
    return {"seconds": seconds, "runs": runs, "memory": memory.as_dict(), "result": result}


def subset_size(n_queries: int, n_gallery: int, dim: int, max_entries: float, max_flops: float) -> int:
    by_memory = int(max_entries // n_gallery)
    by_flops = int(max_flops // (2 * n_gallery * dim))
    return max(min(n_queries, by_memory, by_flops), min(100, n_queries))


def one_size(dim: int, n_gallery: int, config: dict, seed: int, top_k: bool) -> dict:
    n_queries = config["queries"]
    gallery, queries, true_index = make_data(n_gallery, dim, n_queries, seed)
    row: dict = {"dim": dim, "gallery": n_gallery, "storage": np.dtype(STORAGE[dim]).name, "queries": n_queries,
                 "gallery_mb": gallery.nbytes / 2**20,
                 "full_matrix_mb": n_queries * n_gallery * 4 / 2**20}
    streamed = measured(lambda: retrieval.true_ranks(queries, gallery, true_index))
    ranks = streamed.pop("result")
    row["streamed"] = {**streamed, "queries_per_second": n_queries / streamed["seconds"]}
    row["recall"] = retrieval.recall_at_k(ranks, retrieval.PAPER_KS, n_gallery)

    m = subset_size(n_queries, n_gallery, dim, config["naive_entries"], config["naive_flops"])
    naive = measured(lambda: naive_ranks(queries[:m], gallery, true_index[:m]))
    row["naive"] = {**{k: v for k, v in naive.items() if k != "result"}, "queries": m,
                    "queries_per_second": m / naive["seconds"],
                    "agreement_with_streamed": compare_ranks(naive["result"], ranks[:m], queries[:m], gallery,
                                                             true_index[:m])}

    if top_k:
        streamed_top = measured(lambda: retrieval.top_k(queries, gallery, K_TOP))
        top = streamed_top.pop("result")
        row["top_k"] = {**streamed_top, "k": K_TOP, "queries_per_second": n_queries / streamed_top["seconds"]}
        m = subset_size(n_queries, n_gallery, dim, config["naive_entries"], config["naive_flops"])
        old = measured(lambda: naive_top_k(queries[:m], gallery, K_TOP))
        row["naive_top_k"] = {**{k: v for k, v in old.items() if k != "result"}, "k": K_TOP, "queries": m,
                              "queries_per_second": m / old["seconds"],
                              "agreement_with_streamed": compare_top_k(old["result"], top[:m], queries[:m], gallery)}
    return row


def figures_of(row: dict) -> list[dict]:
    size = f"{row['dim']}-D, gallery {row['gallery']:.0e}".replace("e+0", "e")
    s, n = row["streamed"], row["naive"]
    out = [
        figure(f"R@K ranks, streamed, {size}", s["queries_per_second"], "queries/s",
               f"naive full matrix ({n['queries']} queries)", n["queries_per_second"], "higher",
               f"{row['queries']} queries in {s['seconds']:.2f} s"),
        figure(f"R@K ranks, streamed, peak memory added, {size}", max(s["memory"]["peak_extra_mb"], 0.1), "MB",
               f"the full {row['queries']} x gallery float32 matrix", row["full_matrix_mb"], "lower",
               f"naive on {n['queries']} queries added {n['memory']['peak_extra_mb']:.0f} MB"),
    ]
    if "top_k" in row:
        t, old_t = row["top_k"], row["naive_top_k"]
        out.append(figure(f"top-{t['k']}, streamed, {size}", t["queries_per_second"], "queries/s",
                          f"naive full matrix + topk ({old_t['queries']} queries)", old_t["queries_per_second"],
                          "higher",
                          f"{row['queries']} queries in {t['seconds']:.2f} s, "
                          f"peak +{t['memory']['peak_extra_mb']:.0f} MB"))
    return out


def measure(quick: bool = False, queries: int | None = None, seed: int = 0) -> dict:
    config = dict(QUICK if quick else FULL)
    if queries:
        config["queries"] = queries
    rows = []
    for dim, sizes in config["sizes"].items():
        for n_gallery in sizes:
            rows.append(one_size(dim, n_gallery, config, seed, n_gallery in config["top_k_sizes"].get(dim, [])))
    figures = [f for row in rows for f in figures_of(row)]
    result = {"metric": "cosine", "config": {k: v for k, v in config.items()}, "rows": rows, "figures": figures,
              "skipped": [{"name": "4096-D gallery of 1e6", "reason": STOPPED_4096}]}
    target = next((r for r in rows if r["dim"] == TARGET["dim"] and r["gallery"] == TARGET["gallery"]
                   and r["queries"] == TARGET["queries"]), None)
    result["target"] = {**TARGET, "measured_seconds": None if target is None else target["streamed"]["seconds"],
                        "met": None if target is None else target["streamed"]["seconds"] < TARGET["seconds"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int)
    args = parser.parse_args()
    result = measure(args.quick, args.queries)
    for fig in result["figures"]:
        print(f"{fig['name']}: {fig['value']:.4g} {fig['unit']} vs {fig['baseline']} {fig['baseline_value']:.4g} "
              f"(ratio {fig['ratio']:.3f}; {fig['note']})")
    print(json.dumps(result["target"]))


if __name__ == "__main__":
    main()
