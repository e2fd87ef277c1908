"""On-disk format of the spectrogram stage (``data/spectrograms/``), and its loader.

One extract shard -> one spectrogram shard of the same name:
  shard-NNNNN.npy   (n_ok, frames, frequencies, 2) float16|float32, memory-mappable;
                    clip ``row`` r of the table is array[r] ([..., 0] real, [..., 1] imaginary)
  shard-NNNNN.csv   clip_id, row (-1 when skipped), status, reason, source_seconds
                    (the clip's audio length before looping/cutting)
  index.csv         all shard tables, in order, with a ``shard`` column
  config.json       STFT settings, dtype and code fingerprint the shards were made with: a
                    change wipes the folder (speech2face.core.shards.reset_if_config_changed)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from speech2face.core.tables import OK, read_table

TABLE_COLUMNS = ["clip_id", "row", "status", "reason", "source_seconds"]
INDEX_COLUMNS = TABLE_COLUMNS + ["shard"]


def array_path(folder: str | Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.npy"


def open_array(path: str | Path) -> np.memmap:
    """A shard's array, memory-mapped read-only (no copy into RAM, no pickle)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def open_spectrograms(folder: str | Path) -> tuple[pd.DataFrame, dict[str, np.memmap]]:
    """(index, {shard: memory-mapped array}) of a spectrogram stage output.

    The spectrogram of an ``ok`` index row is ``arrays[row.shard][row.row]``.
    """
    folder = Path(folder)
    index_path = folder / "index.csv"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found (run the spectrogram stage first)")
    index = read_table(index_path)
    arrays: dict[str, np.memmap] = {}
    for shard in index.loc[index["status"] == OK, "shard"].unique():
        array = open_array(array_path(folder, shard))
        n_ok = int((index["shard"] == shard).mul(index["status"] == OK).sum())
        if array.shape[0] != n_ok:
            raise ValueError(f"{array_path(folder, shard)} holds {array.shape[0]} spectrograms, "
                             f"index.csv lists {n_ok}: the folder is inconsistent, rerun the stage")
        arrays[shard] = array
    return index, arrays
