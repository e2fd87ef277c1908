"""Manifests and index tables: CSV, one row per input, with ``status`` and ``reason``.

CSV (not parquet) so a person can open a manifest in any editor and diff it in git/DVC.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd

from speech2face.core.fsutil import atomic_path

OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


@contextlib.contextmanager
def table_writer(path: str | Path, columns: Sequence[str],
                 chunk_rows: int = 1000) -> Iterator[Callable[[dict[str, Any]], None]]:
    """``add(row)`` for rows in order, written a chunk at a time: the same bytes as
    ``write_table(pd.DataFrame(rows, columns=columns), path)`` without holding every row.

    pandas formats each value on its own (a float column's ``1.5``, an empty cell for None or
    NaN), so cutting the rows into chunks changes no byte (tests/data/test_download_scale.py
    compares the two across chunk edges). Like ``write_table``, the file appears only when the block succeeds.
    """
    chunk: list[dict[str, Any]] = []
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        pd.DataFrame(columns=list(columns)).to_csv(out, index=False)   # the header line

        def flush() -> None:
            if chunk:
                pd.DataFrame(chunk, columns=list(columns)).to_csv(out, index=False, header=False)
                chunk.clear()

        def add(row: dict[str, Any]) -> None:
            chunk.append(row)
            if len(chunk) >= chunk_rows:
                flush()

        yield add
        flush()


def read_table(path: str | Path) -> pd.DataFrame:
    # keep_default_na=False: an id like "NA" or "nan" stays a string, and empty reasons stay "".
    return pd.read_csv(path, dtype={"clip_id": str, "youtube_id": str, "identity": str, "reason": str},
                       keep_default_na=False)
