"""The identity split (speech2face.data.split): test ids from a list (faces.split_by: csv),
and the hash split (split_by: video) pinned so that the new mode cannot move it.

The hash split's own properties (deterministic, near the fractions, stable, tiny sets) are
tested in test_faces.py, next to the stage that applies it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from speech2face.data import split

IDS = [f"vid{i:05d}" for i in range(1000)]
TEST_IDS = set(IDS[::4])   # chosen by position, independent of the hash (as AVSpeech's test CSV is)

# sha256 of "identity split" lines of assign_splits(IDS, (0.7, 0.1, 0.2), seed 0), taken
# before split_by existed: the default pipeline's index.csv (hash-checked through dvc.lock)
# depends on every one of them.
VIDEO_SPLIT_SHA256 = "0153d0dae71b05a13d06ed086a723c7d53cb5a9b3ef6af386fc2254142920512"


def _digest(splits: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{i} {s}\n" for i, s in sorted(splits.items())).encode()).hexdigest()


def test_video_split_is_unchanged() -> None:
    assert _digest(split.assign_splits(IDS, (0.7, 0.1, 0.2), seed=0)) == VIDEO_SPLIT_SHA256


def test_test_ids_are_test_and_nothing_else_is() -> None:
    splits = split.assign_splits_by_test_ids(IDS, TEST_IDS, (0.7, 0.1, 0.2), seed=0)
    assert set(splits) == set(IDS)
    assert {i for i, s in splits.items() if s == "test"} == TEST_IDS
    assert all(splits[i] in ("train", "val") for i in IDS if i not in TEST_IDS)


def test_the_others_are_cut_by_the_renormalised_hash() -> None:
    splits = split.assign_splits_by_test_ids(IDS, TEST_IDS, (0.7, 0.1, 0.2), seed=0)
    others = [i for i in IDS if i not in TEST_IDS]
    # train / (train + val) = 0.7 / 0.8: the same u as the video split, cut at 0.875
    for identity in others:
        expected = "train" if split.identity_unit(identity, 0) < 0.875 else "val"
        assert splits[identity] == expected, identity
    train_share = np.mean([splits[i] == "train" for i in others])
    assert abs(train_share - 0.875) < 0.045   # 750 ids: sd 0.012, 3.7 sd
    # an identity in train or val under the video split keeps its u: those in train stay there
    video = split.assign_splits(IDS, (0.7, 0.1, 0.2), seed=0)
    assert all(splits[i] == "train" for i in others if video[i] == "train")


def test_deterministic_order_free_and_stable_when_others_come_and_go() -> None:
    splits = split.assign_splits_by_test_ids(IDS, TEST_IDS, (0.6, 0.2, 0.2), seed=7)
    assert splits == split.assign_splits_by_test_ids(list(reversed(IDS)), sorted(TEST_IDS), (0.6, 0.2, 0.2), 7)
    grown = split.assign_splits_by_test_ids(IDS + [f"new{i}" for i in range(300)], TEST_IDS, (0.6, 0.2, 0.2), 7)
    assert all(grown[i] == splits[i] for i in IDS)
    other_seed = split.assign_splits_by_test_ids(IDS, TEST_IDS, (0.6, 0.2, 0.2), seed=8)
    assert all(other_seed[i] == "test" for i in TEST_IDS)                  # the seed never moves test
    assert any(other_seed[i] != splits[i] for i in IDS if i not in TEST_IDS)


def test_test_ids_outside_the_identities_are_ignored() -> None:
    splits = split.assign_splits_by_test_ids(["a1", "b2"], {"b2", "zz_not_here"}, (0.7, 0.1, 0.2), 0)
    assert set(splits) == {"a1", "b2"} and splits["b2"] == "test"


def test_train_guarantee_never_takes_a_test_id() -> None:
    fractions = (0.7, 0.1, 0.2)
    # three identities outside the list that the renormalised hash all puts in val
    in_val = [i for i in (f"v{k}" for k in range(400)) if split.identity_unit(i, 0) >= 0.875][:3]
    assert len(in_val) == 3
    splits = split.assign_splits_by_test_ids(in_val + ["t1", "t2"], {"t1", "t2"}, fractions, 0)
    smallest = min(in_val, key=lambda i: split.identity_unit(i, 0))
    assert splits[smallest] == "train"
    assert sorted(splits[i] for i in in_val) == ["train", "val", "val"]
    assert splits["t1"] == splits["t2"] == "test"
    # everybody in the list: all test, no train, whatever the fractions ask
    assert split.assign_splits_by_test_ids(["t1", "t2", "t3"], {"t1", "t2", "t3"}, fractions, 0) == {
        "t1": "test", "t2": "test", "t3": "test"}
    # train fraction 0: no guarantee, the others all go to val
    assert set(split.assign_splits_by_test_ids(in_val, set(), (0.0, 0.5, 0.5), 0).values()) == {"val"}


def test_nowhere_to_put_the_others() -> None:
    with pytest.raises(ValueError, match="train or val a share"):
        split.assign_splits_by_test_ids(["a"], {"a"}, (0.0, 0.0, 1.0), 0)
    with pytest.raises(ValueError, match="sum to 1"):
        split.assign_splits_by_test_ids(["a"], {"a"}, (0.7, 0.1, 0.1), 0)
    assert split.train_share_outside_test((1.0, 0.0, 0.0)) == 1.0
    assert split.split_outside_test(0.999, (1.0, 0.0, 0.0)) == "train"
    assert split.split_outside_test(0.0, (0.0, 0.3, 0.7)) == "val"
