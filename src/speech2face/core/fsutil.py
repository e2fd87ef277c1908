"""Small filesystem helpers: atomic writes and safe names."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

# Ids become file names: letters, digits, '-' and '_' only (YouTube ids use exactly these),
# so no id can climb out of its folder ('..', '/'), hide ('.x') or mean anything to a shell.
# A leading '-' is allowed: about 1 in 64 real YouTube ids starts with one. Ids only ever
# appear inside a URL or a path that starts with its folder, never as a bare argument, so
# no program can read one as an option.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_safe_id(value: str) -> bool:
    return _SAFE_ID.fullmatch(value) is not None


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it onto ``final`` only if the block succeeds.

    An interrupted run leaves at most a ``.tmp-*`` file, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else final.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.stem}-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp makes the file owner-only; give it the permissions of a normal new file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(".tmp-*"))
    for path in stale:
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` atomically, with bytes that depend on ``obj`` only.

    torch names the archive inside its zip after the file it writes to, so saving to a
    random temp name and renaming would give different bytes (and DVC hashes) every run;
    the archive is written in memory (named ``archive``) and then to disk.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# Every entry of a reproducible zip gets this time stamp and these permissions.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(file, **arrays) -> None:
    """``np.savez`` with reproducible bytes (numpy stamps each entry with the current time)."""
    import numpy as np

    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
