"""Retrieval evaluation: voice -> face R@K on the test split, a ridge baseline, and plots.

Gallery items are test identities (the mean face feature of each identity's test clips);
each test clip's voice is a query whose true item is its identity. With at least
``gallery_size`` test identities the paper's protocol also runs: random galleries of
``gallery_size`` identities containing the true one, averaged over seeded draws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import retrieval
from .pairs import Pairs


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


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray,
                      ks=retrieval.PAPER_KS, sampled_gallery_size: int = 100, draws: int = 10,
                      seed: int = 0) -> dict:
    """{metric: {"whole": {K: R@K}, "sampled": {K: (mean, std)} or None}} for cosine, L2, L1."""
    out = {}
    for metric in retrieval.METRICS:
        ranks = retrieval.true_ranks(queries, gallery, true_index, metric)
        result = {"whole": retrieval.recall_at_k(ranks, ks, len(gallery)), "sampled": None,
                  "mean_rank": float(ranks.mean() + 1)}
        if len(gallery) >= sampled_gallery_size:
            distances = retrieval.pairwise_distance(torch.as_tensor(queries), torch.as_tensor(gallery),
                                                    metric).numpy()
            result["sampled"] = retrieval.sampled_gallery_recall(distances, true_index, sampled_gallery_size,
                                                                 draws, seed, ks)
        out[metric] = result
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


def ridge_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Ridge regression (alpha by cross-validation) from pooled log-mel to face features."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_x, train_y)
    return model.predict(test_x).astype(np.float32), float(model[-1].alpha_)


def recall_table(results: dict[str, dict], gallery_size: int, metric: str = "cosine") -> pd.DataFrame:
    """Long table K x model -> R@K (whole test gallery), with chance, for the DVC plot."""
    rows = []
    for model_name, metrics in results.items():
        for k, value in metrics[metric]["whole"].items():
            rows.append({"k": k, "model": model_name, "recall": value})
    for k in next(iter(results.values()))[metric]["whole"]:
        rows.append({"k": k, "model": "chance", "recall": retrieval.chance_recall(k, gallery_size)})
    return pd.DataFrame(rows)


def plot_recall(table: pd.DataFrame, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model_name, group in table.groupby("model", sort=False):
        style = "--" if model_name == "chance" else "-o"
        ax.plot(group["k"], 100 * group["recall"], style, label=model_name)
    ax.set_xlabel("K")
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


def summary_markdown(results: dict[str, dict], similarity: dict[str, dict], n_gallery: int, n_queries: int,
                     n_train: int) -> str:
    """The human-readable report: R@K per metric for the CNN and the baseline, with chance."""
    lines = [f"# Voice -> face retrieval on the test split", "",
             f"{n_queries} test voices, {n_gallery} test identities (never seen in training), "
             f"{n_train} training pairs. Recall at K in %, whole test set as the gallery.", ""]
    for metric in retrieval.METRICS:
        ks = list(results["cnn"][metric]["whole"])
        lines += [f"## {metric}", "", "| model | " + " | ".join(f"R@{k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name, metrics in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * metrics[metric]['whole'][k]:.1f}" for k in ks) + " |")
        lines.append("| chance | " + " | ".join(f"{100 * retrieval.chance_recall(k, n_gallery):.1f}" for k in ks)
                     + " |")
        sampled = results["cnn"][metric]["sampled"]
        if sampled:
            lines += ["", "Paper protocol (galleries of 100, mean +- std over draws): " + ", ".join(
                f"R@{k} {100 * m:.1f} +- {100 * sd:.1f}" for k, (m, sd) in sampled.items())]
        lines.append("")
    lines += ["## Feature similarity (predicted vs true face feature, mean +- std)", "",
              "| model | cosine angle (deg) | L1 | L2 |", "|---|---|---|---|"]
    for name, sim in similarity.items():
        lines.append(f"| {name} | " + " | ".join(f"{sim[key][0]:.3g} +- {sim[key][1]:.2g}"
                                                  for key in ("cosine_angle_deg", "l1", "l2")) + " |")
    return "\n".join(lines) + "\n"
