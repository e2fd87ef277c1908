"""Deterministic train / val / test split by identity (AVSpeech: the YouTube video id).

Each identity gets a number u in [0, 1) from a hash of (seed, identity); the fractions cut
[0, 1) into three intervals: train = [0, f_train), val = [f_train, f_train + f_val),
test = the rest. Because an identity's split depends on nothing but its own id and the
seed, adding or removing other identities never moves it (a shuffle-based split would
reshuffle everybody), and all clips of one identity land in the same split.

Tiny sets: with 3 or more identities, train and test are guaranteed non-empty (when their
fractions are > 0). If the hash leaves test empty, the identity with the largest u (the one
nearest the test interval) moves to test; then, if train is empty, the identity with the
smallest u outside test (or, if all are in test, the smallest overall) moves to train. Only these small sets ever deviate from the pure
hash rule, and they deviate the same way on every run.

Test ids from a list (``assign_splits_by_test_ids``; the faces stage's ``split_by: csv``):
a video-id split can put one person who speaks in several videos in train and in test.
AVSpeech's own test CSV is held out from its train CSV (no shared video), so its ids are the
test split, and nothing else is. The other identities are cut by the same u into train =
[0, f_train / (f_train + f_val)) and val = the rest: the test fraction is whatever the list
makes it, and train and val keep their ratio. Train (when f_train > 0) is non-empty whenever
an identity lies outside the list (the smallest u outside it moves there); test gets no
guarantee, since moving an identity into it would change what the list means (the faces
stage refuses an empty test split instead).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

SPLITS = ("train", "val", "test")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test); raises ValueError unless three numbers >= 0 summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"split fractions must be [train, val, test], got {list(fractions)!r}")
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"split fractions must be finite and >= 0, got {list(fractions)!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def identity_unit(identity: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, identity); the same on every machine."""
    digest = hashlib.sha256(f"{seed}\x00{identity}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of_unit(u: float, fractions: Sequence[float]) -> str:
    train, val, _ = fractions
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def assign_splits(identities: Iterable[str], fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0) -> dict[str, str]:
    """{identity: 'train' | 'val' | 'test'} for the distinct identities given."""
    fractions = check_fractions(fractions)
    units = {identity: identity_unit(identity, seed) for identity in sorted(set(identities))}
    splits = {identity: split_of_unit(u, fractions) for identity, u in units.items()}
    if len(units) >= 3:
        by_unit = sorted(units, key=lambda identity: (units[identity], identity))
        if fractions[2] > 0 and "test" not in splits.values():
            splits[by_unit[-1]] = "test"
        if fractions[0] > 0 and "train" not in splits.values():
            # Everyone may already be in test (e.g. fractions [0.1, 0, 0.9]): then take
            # test's smallest u, which still leaves test at least one identity.
            not_test = [identity for identity in by_unit if splits[identity] != "test"]
            splits[(not_test or by_unit)[0]] = "train"
    return splits


def train_share_outside_test(fractions: Sequence[float]) -> float:
    """f_train / (f_train + f_val): where u cuts train from val when a list fixes test.

    Raises ValueError when both are 0 (nowhere to put the identities outside the list)."""
    train, val, _ = check_fractions(fractions)
    if train + val <= 0:
        raise ValueError(f"split fractions must give train or val a share when a list fixes test, "
                         f"got {list(fractions)!r}")
    return train / (train + val)


def split_outside_test(u: float, fractions: Sequence[float]) -> str:
    """'train' or 'val' for an identity that is not in the list of test ids."""
    return "train" if u < train_share_outside_test(fractions) else "val"


def assign_splits_by_test_ids(identities: Iterable[str], test_ids: Iterable[str],
                              fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> dict[str, str]:
    """{identity: split} for the distinct identities given: 'test' exactly for those in
    ``test_ids``, the others 'train' or 'val' by their u (see the module's docstring)."""
    fractions = check_fractions(fractions)
    train_share_outside_test(fractions)   # fail on [0, 0, 1] before looking at any identity
    test_ids = set(test_ids)
    units = {identity: identity_unit(identity, seed) for identity in sorted(set(identities))}
    splits = {identity: "test" if identity in test_ids else split_outside_test(u, fractions)
              for identity, u in units.items()}
    outside = sorted((u, identity) for identity, u in units.items() if identity not in test_ids)
    if fractions[0] > 0 and outside and "train" not in splits.values():
        splits[outside[0][1]] = "train"
    return splits
