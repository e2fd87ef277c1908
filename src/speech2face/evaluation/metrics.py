"""Retrieval evaluation: voice -> face R@K on the test (and validation) split, a ridge
baseline, intervals, and the report.

Gallery items are a split's identities (the mean face feature of each identity's clips);
each clip's voice is a query whose true item is its identity. With at least
``gallery_size`` identities the paper's protocol also runs: random galleries of
``gallery_size`` identities containing the true one, averaged over seeded draws. Figures
are kept per query (``retrieval_hits``) so that ``intervals.ClusterBootstrap`` can give
each one, and each paired comparison, a 95 % interval over identities.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from speech2face.core.errors import Speech2FaceError
from speech2face.data.pairs import Pairs
from speech2face.evaluation import retrieval
from speech2face.evaluation.intervals import ClusterBootstrap, verdict


def predict_features(model: torch.nn.Module, pairs: Pairs, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = np.stack([np.asarray(pairs.spectrogram(i), dtype=np.float32)
                              for i in range(start, min(start + batch_size, len(pairs)))])
            out.append(model(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.out_dim), np.float32)


def identity_gallery(identities: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery identities, gallery features = per-identity mean, true gallery index per row)."""
    names, true_index = np.unique(identities, return_inverse=True)
    gallery = np.zeros((len(names), features.shape[1]), np.float32)
    np.add.at(gallery, true_index, features)
    gallery /= np.bincount(true_index)[:, None]
    return names, gallery, true_index


class EvaluationError(Speech2FaceError, ValueError):
    """The evaluation cannot give honest figures (e.g. non-finite predictions): one line."""


def check_predictions(predicted: np.ndarray, clip_ids, model: str) -> None:
    """Stop with one line when any prediction is non-finite or has zero length: such a
    vector has no direction, and no R@K of it means anything."""
    predicted = np.asarray(predicted, dtype=np.float64)
    non_finite = ~np.isfinite(predicted).all(axis=1)
    zero = ~non_finite & ~np.any(predicted != 0, axis=1)
    bad = np.flatnonzero(non_finite | zero)
    if len(bad):
        kinds = " or ".join(name for name, mask in (("non-finite", non_finite), ("zero-length", zero)) if mask.any())
        names = ", ".join([str(clip_ids[i]) for i in bad[:5]] + (["..."] if len(bad) > 5 else []))
        raise EvaluationError(f"{model}: {len(bad)} of {len(predicted)} predictions are {kinds} (clips {names}); "
                              "the model diverged or collapsed: retrain it")


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def retrieval_hits(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray, ks=retrieval.PAPER_KS,
                   sampled_gallery_size: int | None = 100, draws: int = 10, seed: int = 0) -> dict:
    """Per-query outcomes: {metric: {"whole": {K: 0/1 per query}, "sampled": {K: share of
    draws per query} or None, "rank": 1-based rank per query}}.

    Queries and gallery are scaled to unit length first, for every metric: the length of
    an encoder output is not what is being asked about (the normalised-L2 term fixes only
    its direction, and the face decoder reads every input at the training features' mean
    length), so L1/L2 distances on raw outputs would rank partly by an accident of scale.
    On unit vectors L2 orders items exactly as cosine does (|q-g|^2
    = 2 - 2 q.g); L1 differs a little. The paper reports all three, so all three are here.
    The paper's random galleries run when ``sampled_gallery_size`` is set and the gallery
    has at least that many identities.
    """
    queries, gallery = unit(queries), unit(gallery)
    out = {}
    for metric in retrieval.METRICS:
        ranks = retrieval.true_ranks(queries, gallery, true_index, metric)
        out[metric] = {
            "whole": retrieval.hits_at_k(ranks, ks, len(gallery)),
            "sampled": (retrieval.sampled_gallery_hits(queries, gallery, true_index, sampled_gallery_size, draws,
                                                       seed, ks, metric)
                        if sampled_gallery_size and len(gallery) >= sampled_gallery_size else None),
            "rank": (ranks + 1).astype(np.float64),
        }
    return out


def with_intervals(hits: dict, boot: ClusterBootstrap) -> dict:
    """``retrieval_hits`` summarised: every figure as {"value", "low", "high"}."""
    out = {}
    for metric, result in hits.items():
        out[metric] = {
            "whole": {k: boot.interval(v).as_dict() for k, v in result["whole"].items()},
            "sampled": ({k: boot.interval(v).as_dict() for k, v in result["sampled"].items()}
                        if result["sampled"] is not None else None),
            "mean_rank": boot.interval(result["rank"]).as_dict(),
        }
    return out


def similarity_with_intervals(predicted: np.ndarray, true: np.ndarray, boot: ClusterBootstrap) -> dict:
    """Feature similarity (cosine angle; L1 and L2 between unit-length vectors) with intervals."""
    per_query = retrieval.feature_similarity_per_query(unit(predicted), unit(true))
    return {name: boot.interval(values).as_dict() for name, values in per_query.items()}


def comparisons(hits: dict[str, dict], chance: dict[int, float], boot: ClusterBootstrap,
                ks=(1, 5, 10)) -> dict[str, dict]:
    """Paired differences on the whole gallery, cosine: each model against chance, and the
    first model against each other one. {"cnn - ridge": {K: interval}, "cnn - chance": ...}."""
    names = list(hits)
    out: dict[str, dict] = {}
    pairs = [(names[0], other) for other in names[1:]]
    for a, b in pairs:
        out[f"{a} - {b}"] = {k: boot.difference(hits[a]["cosine"]["whole"][k], hits[b]["cosine"]["whole"][k])
                             for k in ks if k in hits[a]["cosine"]["whole"]}
    for name in names:
        out[f"{name} - chance"] = {k: boot.difference(hits[name]["cosine"]["whole"][k], chance[k])
                                   for k in ks if k in hits[name]["cosine"]["whole"]}
    return out


def pooled_log_mel(spectrogram: np.ndarray, power: float, sample_rate: int = 16000, n_mels: int = 40) -> np.ndarray:
    """Baseline input: mean and std over time of log-mel energies, from a stored spectrogram.

    The stored array is sgn(S)|S|^p on real and imaginary parts, so |S|^2 is recovered as
    (re_c^(2/p) + im_c^(2/p)).
    """
    import librosa

    spec = np.asarray(spectrogram, dtype=np.float64)
    power_spectrum = np.abs(spec[..., 0]) ** (2 / power) + np.abs(spec[..., 1]) ** (2 / power)  # (T, F)
    n_fft = 2 * (spec.shape[1] - 1)
    mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
    log_mel = np.log(power_spectrum @ mel.T + 1e-10)
    return np.concatenate([log_mel.mean(axis=0), log_mel.std(axis=0)]).astype(np.float32)


def fit_ridge(train_x: np.ndarray, train_y: np.ndarray):
    """Ridge regression (alpha by cross-validation) from pooled log-mel to face features:
    (fitted model, chosen alpha)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_x, train_y)
    return model, float(model[-1].alpha_)


def recall_table(results: dict[str, dict], gallery_size: int, metric: str = "cosine") -> pd.DataFrame:
    """Long table K x model -> R@K with its interval (whole test gallery), and chance."""
    rows = []
    for model_name, metrics in results.items():
        for k, figure in metrics[metric]["whole"].items():
            rows.append({"k": k, "model": model_name, "recall": figure["value"], "low": figure["low"],
                         "high": figure["high"]})
    for k in next(iter(results.values()))[metric]["whole"]:
        chance = retrieval.chance_recall(k, gallery_size)
        rows.append({"k": k, "model": "chance", "recall": chance, "low": chance, "high": chance})
    return pd.DataFrame(rows)


def plot_recall(table: pd.DataFrame, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model_name, group in table.groupby("model", sort=False):
        style = "--" if model_name == "chance" else "-o"
        line, = ax.plot(group["k"], 100 * group["recall"], style, label=model_name)
        if model_name != "chance":
            ax.fill_between(group["k"], 100 * group["low"], 100 * group["high"], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set_xlabel("K (shaded: 95 % interval, bootstrap over test identities)")
    ax.set_ylabel("recall at K (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gallery(query_ids: list[str], top: np.ndarray, true_index: np.ndarray, gallery_crops: np.ndarray,
                 query_crops: np.ndarray, path, k: int = 5) -> None:
    """One row per query voice: its true face, then the top-k retrieved faces (true one framed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(query_ids)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.75 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(query_crops[r])
        axes[r, 0].set_title("true face" if r == 0 else "", fontsize=8)
        axes[r, 0].set_ylabel(query_ids[r][:14], fontsize=6)
        for c in range(k):
            ax = axes[r, c + 1]
            if c < top.shape[1]:
                ax.imshow(gallery_crops[top[r, c]])
                if top[r, c] == true_index[r]:
                    for spine in ax.spines.values():
                        spine.set_edgecolor("lime")
                        spine.set_linewidth(4)
            if r == 0:
                ax.set_title(f"#{c + 1}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("voice -> top-5 retrieved faces (green frame: the speaker)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cell(figure: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``{"value", "low", "high"}`` as "value [low, high]" (in % by default)."""
    return f"{scale * figure['value']:.{digits}f} [{scale * figure['low']:.{digits}f}, {scale * figure['high']:.{digits}f}]"


def recall_rows(results: dict[str, dict], metric: str, n_gallery: int, part: str = "whole") -> list[str]:
    """Markdown table rows: one per model, R@K with intervals, then chance."""
    ks = list(next(iter(results.values()))[metric][part])
    lines = ["| model | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(metrics[metric][part][k]) for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * retrieval.chance_recall(k, n_gallery):.1f}" for k in ks) + " |")
    return lines


def summary_markdown(test: dict, val: dict | None, similarity: dict[str, dict], compared: dict[str, dict],
                     counts: dict[str, int], bootstrap: dict) -> str:
    """The human-readable report. ``test``/``val``: {model: with_intervals(...)};
    ``compared``: ``comparisons(...)``; ``counts``: queries/identities/train pairs."""
    lines = ["# Voice -> face retrieval", "",
             f"Test split: {counts['test_queries']} voices of {counts['test_identities']} identities never seen in "
             f"training ({counts['train_pairs']} training pairs); the gallery is every test identity. Recall at K in %, "
             f"with a 95 % interval in brackets: a bootstrap over test identities ({bootstrap['replicates']} "
             f"replicates, seed {bootstrap['seed']}; voices of one identity are resampled together). Ties count "
             "against the model.", "",
             "## Test split, cosine", ""] + recall_rows(test, "cosine", counts["test_identities"])
    sampled = next(iter(test.values()))["cosine"]["sampled"]
    if sampled:
        lines += ["", "Paper protocol (random galleries of 100 identities, averaged over draws):", ""]
        lines += recall_rows(test, "cosine", 100, part="sampled")
    lines += ["", "Paired differences (the same bootstrap replicates for both sides):", ""]
    for pair, by_k in compared.items():
        for k, difference in by_k.items():
            lines.append(f"- {pair}, R@{k}: {verdict(difference)}")
    if val is not None:
        lines += ["", "## Validation split, cosine", "",
                  f"{counts['val_queries']} voices of {counts['val_identities']} identities. Choose settings "
                  "(`dvc exp run -S ...`) by these figures; the test split is only reported.", ""]
        lines += recall_rows(val, "cosine", counts["val_identities"])
    lines += ["", "## Test split, L2 and L1", "",
              "Predictions and gallery features are scaled to unit length first: the normalised-L2 term fixes only "
              "the direction of a prediction and the face decoder reads every input at one length, so distances "
              "between raw outputs would rank partly by scale. On unit vectors L2 ranks exactly as cosine does; "
              "L1 differs a little.", ""]
    for metric in ("l2", "l1"):
        lines += [f"**{metric.upper()}**", ""] + recall_rows(test, metric, counts["test_identities"]) + [""]
    lines += ["## Feature similarity (predicted vs true face feature, test split)", "",
              "Mean with 95 % interval; L1 and L2 between unit-length vectors.", "",
              "| model | cosine angle (deg) | L1 | L2 |", "|---|---|---|---|"]
    for name, sim in similarity.items():
        lines.append(f"| {name} | " + " | ".join(cell(sim[key], scale=1.0, digits=3 if key != "cosine_angle_deg" else 1)
                                                  for key in ("cosine_angle_deg", "l1", "l2")) + " |")
    return "\n".join(lines) + "\n"
