"""Speaker-separation measures on tiny examples whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from speech2face.evaluation.speaker_check import (equal_error_rate, nearest_same_speaker_share, pair_scores,
                                                  speaker_separation)

# a1, a2 close together; b1 alone; b2 (0.8, 0.6) is nearer a2 (cosine 0.902) than b1 (0.6):
# 3 of the 4 nearest other utterances have the same speaker.
POINTS = np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.8, 0.6]])
SPEAKERS = ["a", "a", "b", "b"]


def test_nearest_same_speaker_share_by_hand() -> None:
    assert nearest_same_speaker_share(POINTS, SPEAKERS) == 0.75
    # cosine: the length of an embedding does not matter
    assert nearest_same_speaker_share(POINTS * np.array([[3.0], [0.1], [7.0], [0.5]]), SPEAKERS) == 0.75
    moved = POINTS.copy()
    moved[3] = [0.6, 0.8]   # now nearer b1 (0.8) than a2 (0.745)
    assert nearest_same_speaker_share(moved, SPEAKERS) == 1.0


def test_pair_scores_split_the_pairs_by_speaker() -> None:
    same, different = pair_scores(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]), ["a", "a", "b"])
    np.testing.assert_allclose(same, [0.0])                       # (0, 1): orthogonal
    np.testing.assert_allclose(different, [2 ** -0.5, 2 ** -0.5])  # (0, 2), (1, 2): 45 degrees


@pytest.mark.parametrize("same, different, expected", [
    ([0.9, 0.8], [0.3, 0.1], 0.0),                    # separated: a threshold between makes no error
    ([0.1, 0.3], [0.8, 0.9], 1.0),                    # inverted: every threshold errs on one kind fully
    ([0.9, 0.4], [0.6, 0.1], 0.5),                    # t = 0.6: FAR = FRR = 1/2 exactly
    ([0.9, 0.4], [0.6, 0.3, 0.2, 0.1], 0.25),         # FAR stays 1/4 while FRR jumps 0 -> 1/2: crosses at 1/4
    ([0.5], [0.5], 0.5),                              # a tie: from (FAR 1, FRR 0) straight to (0, 1)
    ([0.9, 0.5], [0.5, 0.1], 0.25),                   # tie at 0.5: (FAR, FRR) from (1/2, 0) to (0, 1/2)
])
def test_equal_error_rate_by_hand(same, different, expected) -> None:
    assert equal_error_rate(np.array(same), np.array(different)) == pytest.approx(expected, abs=1e-12)


def test_equal_error_rate_ignores_the_order_of_scores() -> None:
    rng = np.random.default_rng(0)
    same, different = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 400)
    assert equal_error_rate(same, different) == equal_error_rate(same[::-1], rng.permutation(different))
    assert 0.2 < equal_error_rate(same, different) < 0.5   # d' = 1: EER = Phi(-1/2) = 0.31 in expectation


def test_speaker_separation_chance_level() -> None:
    speakers = np.repeat(np.arange(10), 3)
    points = np.random.default_rng(1).normal(size=(30, 8))
    assert speaker_separation(points, speakers)["nearest_chance"] == pytest.approx(2 / 29)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="3 embeddings, 2 speaker labels"):
        nearest_same_speaker_share(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match="both kinds"):
        equal_error_rate(np.array([]), np.array([0.3]))
