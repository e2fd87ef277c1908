"""Shards: fixed groups of clips that every per-clip stage processes as one unit.

The extract stage cuts the downloaded clips, in manifest order, into shards of
``shard_size``; the spectrogram and face stages write one output shard per extract shard
(same name). A shard is finished when its table (``shard-NNNNN.csv``) exists and lists the
clips it should: tables are written last and atomically, so a rerun after an interruption
redoes only the shards without a table, and a cluster can write shards in parallel.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from speech2face.core.tables import read_table, write_table


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def plan_shards(clip_ids: Sequence[str], shard_size: int) -> list[tuple[str, list[str]]]:
    """[(shard name, clip ids)] in order."""
    ids = list(clip_ids)
    return [(shard_name(i // shard_size), ids[i:i + shard_size]) for i in range(0, len(ids), shard_size)]


def table_path(folder: str | Path, shard: str) -> Path:
    return Path(folder) / f"{shard}.csv"


def finished_table(folder: str | Path, shard: str, clip_ids: Sequence[str]) -> pd.DataFrame | None:
    """The shard's table if it is complete for exactly these clips, else None (redo it)."""
    path = table_path(folder, shard)
    if not path.exists():
        return None
    try:
        table = read_table(path)
    except Exception:
        return None
    if list(table["clip_id"]) != list(clip_ids):
        return None
    return table


def write_shard_table(folder: str | Path, shard: str, table: pd.DataFrame) -> None:
    write_table(table, table_path(folder, shard))


def list_shard_tables(folder: str | Path) -> list[tuple[str, pd.DataFrame]]:
    return [(p.stem, read_table(p)) for p in sorted(Path(folder).glob("shard-*.csv"))]


def remove_unplanned(folder: str | Path, planned: Sequence[str]) -> int:
    """Delete shard files from earlier runs whose shard is no longer planned (e.g. a lower
    limit): ``shard-NNNNN.*`` and ``<kind>-NNNNN.*`` alike."""
    keep = set(planned)
    removed = 0
    for path in Path(folder).glob("*-[0-9][0-9][0-9][0-9][0-9].*"):
        number = _SHARD_NUMBER.search(path.name)
        if number and f"shard-{number.group(1)}" not in keep:
            path.unlink()
            removed += 1
    return removed


_SHARD_NUMBER = re.compile(r"-(\d{5})\.[^.]+$")


def code_fingerprint(*modules) -> str:
    """Hash of the source of the given modules: finished shards are only trusted when the
    code that wrote them is unchanged."""
    import hashlib
    import inspect

    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def reset_if_config_changed(folder: str | Path, config: dict) -> bool:
    """Outputs are persistent (for resume), so a change of params or code must wipe them.

    ``config`` (params + code fingerprint) is stored as ``config.json``; when it differs
    from the stored one, every shard in ``folder`` is deleted. Returns True on a reset.
    """
    import json
    import shutil

    folder = Path(folder)
    path = folder / "config.json"
    wanted = json.dumps(config, sort_keys=True, indent=1)
    if path.exists() and path.read_text() == wanted:
        return False
    existed = folder.exists() and any(folder.iterdir())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path.write_text(wanted)
    return existed
