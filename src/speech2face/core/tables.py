"""Manifests and index tables: CSV, one row per input, with ``status`` and ``reason``.

CSV (not parquet) so a person can open a manifest in any editor and diff it in git/DVC.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from speech2face.core.fsutil import atomic_path

OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    # keep_default_na=False: an id like "NA" or "nan" stays a string, and empty reasons stay "".
    return pd.read_csv(path, dtype={"clip_id": str, "youtube_id": str, "identity": str, "reason": str},
                       keep_default_na=False)
