"""Does an embedding separate speakers? Two measures on a labelled set of utterances, from
cosine similarities (numpy, float64):

- ``nearest_same_speaker_share``: the share of utterances whose most similar OTHER utterance
  is by the same speaker. Chance, with k utterances per speaker among n, is (k - 1) / (n - 1).
- ``equal_error_rate``: verification over every pair of utterances: a pair is accepted as one
  speaker when its cosine is >= a threshold. The EER is where the false-acceptance rate
  (different-speaker pairs accepted) equals the false-rejection rate (same-speaker pairs
  rejected). 0 = perfect separation, 0.5 = chance.
"""

from __future__ import annotations

import numpy as np


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """(n, n) float64 cosine similarities of the rows (a zero row has similarity 0 to all)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings: expected (utterances, dims), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return x @ x.T


def nearest_same_speaker_share(embeddings: np.ndarray, speakers) -> float:
    """Share of utterances whose nearest other utterance (highest cosine; the first in order on
    a tie) has the same speaker label."""
    speakers = np.asarray(speakers)
    similarity = cosine_matrix(embeddings)
    if len(similarity) != len(speakers) or len(speakers) < 2:
        raise ValueError(f"{len(similarity)} embeddings, {len(speakers)} speaker labels: expected as many, >= 2")
    np.fill_diagonal(similarity, -np.inf)   # an utterance is not its own neighbour
    nearest = similarity.argmax(axis=1)
    return float(np.mean(speakers[nearest] == speakers))


def pair_scores(embeddings: np.ndarray, speakers) -> tuple[np.ndarray, np.ndarray]:
    """(cosines of the same-speaker pairs, cosines of the different-speaker pairs), each
    unordered pair i < j once."""
    speakers = np.asarray(speakers)
    similarity = cosine_matrix(embeddings)
    if len(similarity) != len(speakers):
        raise ValueError(f"{len(similarity)} embeddings, {len(speakers)} speaker labels: expected as many")
    i, j = np.triu_indices(len(speakers), k=1)
    same = speakers[i] == speakers[j]
    return similarity[i, j][same], similarity[i, j][~same]


def equal_error_rate(same_scores: np.ndarray, different_scores: np.ndarray) -> float:
    """EER of the rule "same speaker if score >= t": at every threshold t among the scores
    (and above them all), FAR(t) = share of different-speaker scores >= t and FRR(t) = share
    of same-speaker scores < t. FAR falls and FRR rises with t; the EER is where the ROC
    curve, its points (FAR, FRR) joined by straight lines, crosses FAR = FRR."""
    same = np.asarray(same_scores, dtype=np.float64)
    different = np.asarray(different_scores, dtype=np.float64)
    if not len(same) or not len(different):
        raise ValueError(f"{len(same)} same-speaker and {len(different)} different-speaker scores: "
                         f"both kinds are needed")
    thresholds = np.append(np.unique(np.concatenate([same, different])), np.inf)
    # counts of scores below each threshold, by binary search in the sorted scores
    far = 1.0 - np.searchsorted(np.sort(different), thresholds, side="left") / len(different)
    frr = np.searchsorted(np.sort(same), thresholds, side="left") / len(same)
    gap = frr - far          # -1 at the lowest threshold (FAR 1, FRR 0), +1 above all scores
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0:
        return float(far[k])
    # the segment between thresholds k - 1 (gap < 0) and k (gap > 0) crosses FAR = FRR
    fraction = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(far[k - 1] + fraction * (far[k] - far[k - 1]))


def speaker_separation(embeddings: np.ndarray, speakers) -> dict[str, float]:
    """Both measures and the chance level of the first one (for a table)."""
    speakers = np.asarray(speakers)
    _, counts = np.unique(speakers, return_counts=True)
    chance = float(np.sum(counts * (counts - 1)) / (len(speakers) * (len(speakers) - 1)))
    return {"nearest_same_speaker": nearest_same_speaker_share(embeddings, speakers),
            "nearest_chance": chance,
            "eer": equal_error_rate(*pair_scores(embeddings, speakers))}
