"""Progress bars and the one summary line every stage ends with."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "clip") -> Iterable[T]:
    """A tqdm bar on stderr; quiet when not attached to a terminal unless forced."""
    # disable=None: a bar on a terminal, nothing in logs and CI output (the summary line stays)
    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None,
                mininterval=0.5, leave=False)


class StageSummary:
    """Counts outcomes (ok / skipped by reason) and prints one line at the end.

    >>> s = StageSummary("extract"); s.ok(); s.skip("no_audio"); line = s.line()
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.started = time.perf_counter()
        self.done = 0
        self.reused = 0
        self.skipped: Counter[str] = Counter()

    def ok(self, n: int = 1) -> None:
        self.done += n

    def reuse(self, n: int = 1) -> None:
        """Work found finished from an earlier run and kept."""
        self.reused += n

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def add_statuses(self, statuses: Iterable[tuple[str, str]]) -> None:
        for status, reason in statuses:
            if status == "ok":
                self.ok()
            else:
                self.skip(reason or status)

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        parts = [f"{self.done} done"]
        if self.reused:
            parts.append(f"{self.reused} reused from an earlier run")
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
            parts.append(f"{n_skipped} skipped ({reasons})")
        else:
            parts.append("0 skipped")
        return f"{self.stage}: " + ", ".join(parts) + f" in {seconds:.1f} s"

    def print(self) -> str:
        text = self.line()
        print(text, flush=True)
        return text
