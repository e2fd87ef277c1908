"""DVC stage: extracted 16 kHz audio (data/extracted/) -> compressed STFTs (data/spectrograms/).

One memory-mappable ``.npy`` per extract shard (format: speech2face.spectrograms). Shards
finished by an earlier run with the same settings and code are kept.

``compute_shard`` is the unit of work: with the local engine the shards run in this process,
one after another, with ``workers`` torch threads; with the dask engine each shard is a task
on the cluster (speech2face.engine).
"""

from __future__ import annotations

import contextlib
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from speech2face import audio, engine as engines, extracted, shards, spectrograms  # noqa: E402
from speech2face.audio import (STORAGE_DTYPES, SpectrogramSettings, check_storage_dtype,  # noqa: E402
                               spectrogram_batch)
from speech2face.engine import EngineError, read_engine  # noqa: E402
from speech2face.fsutil import atomic_path, remove_stale_temps  # noqa: E402
from speech2face.params import ParamsError, get_choice, get_float, get_int, load_section  # noqa: E402
from speech2face.reporting import StageSummary, progress  # noqa: E402
from speech2face.spectrograms import INDEX_COLUMNS, TABLE_COLUMNS, array_path, open_array  # noqa: E402
from speech2face.tables import OK, SKIPPED, write_table  # noqa: E402

SECTION = "spectrogram"


def _reusable_table(out_dir: Path, shard: str, clip_ids: list[str], settings: SpectrogramSettings,
                    dtype: np.dtype) -> pd.DataFrame | None:
    """The shard's table if the shard was finished for these clips and its array is intact."""
    table = shards.finished_table(out_dir, shard, clip_ids)
    if table is None or not array_path(out_dir, shard).exists():
        return None
    try:
        array = open_array(array_path(out_dir, shard))
    except (OSError, ValueError):
        return None
    n_ok = int((table["status"] == OK).sum())
    if array.shape != (n_ok, *settings.shape) or array.dtype != dtype:
        return None
    return table


def _skipped_rows(clip_ids: list[str], reason: str) -> pd.DataFrame:
    return pd.DataFrame({"clip_id": clip_ids, "row": -1, "status": SKIPPED, "reason": reason,
                         "source_seconds": 0.0}, columns=TABLE_COLUMNS)


def compute_shard(npz_path: Path, out_dir: Path, shard: str, clip_ids: list[str],
                  settings: SpectrogramSettings, dtype: np.dtype, batch_size: int, bar) -> pd.DataFrame:
    """Spectrograms of one extract shard -> its table. A shard whose input is missing or
    inconsistent is reported in the table returned but not written, so a later run retries it."""
    if not npz_path.exists():
        bar.update(len(clip_ids))
        return _skipped_rows(clip_ids, "missing_extract_shard")
    try:
        source = extracted.load_shard(npz_path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        bar.update(len(clip_ids))
        return _skipped_rows(clip_ids, "unreadable_extract_shard")
    if source.clip_ids != clip_ids:
        bar.update(len(clip_ids))
        return _skipped_rows(clip_ids, "extract_shard_mismatch")
    if len(source) and source.sample_rate != settings.sample_rate:
        # Resampling is the extract stage's job: two sample rates mean inconsistent params.
        raise ParamsError(f"{npz_path} holds {source.sample_rate} Hz audio but spectrogram.sample_rate = "
                          f"{settings.sample_rate}: set extract.sample_rate and spectrogram.sample_rate equal")

    rows, statuses, reasons, seconds, usable = [], [], [], [], []
    for i in range(len(source)):
        samples = source.audio(i)
        seconds.append(round(len(samples) / source.sample_rate, 4))
        # Looping cannot make something from nothing; all-zero audio (digital silence)
        # carries no voice, and would teach the encoder a face for silence.
        reason = "empty_audio" if len(samples) == 0 else ("silent_audio" if not np.any(samples) else "")
        statuses.append(SKIPPED if reason else OK)
        reasons.append(reason)
        rows.append(-1 if reason else len(usable))
        if not reason:
            usable.append(i)
    if len(usable) < len(source):
        bar.update(len(source) - len(usable))

    shape = (len(usable), *settings.shape)
    with atomic_path(array_path(out_dir, shard)) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        for start in range(0, len(usable), batch_size):
            batch = usable[start:start + batch_size]
            array[start:start + len(batch)] = spectrogram_batch(
                [source.audio_float(i) for i in batch], settings).astype(dtype)
            bar.update(len(batch))
        array.flush()
        del array  # close the map before the rename
    table = pd.DataFrame({"clip_id": clip_ids, "row": rows, "status": statuses, "reason": reasons,
                          "source_seconds": seconds}, columns=TABLE_COLUMNS)
    shards.write_shard_table(out_dir, shard, table)  # last: marks the shard done
    return table


def run(extract_dir: Path, out_dir: Path, seconds: float, sample_rate: int, window: int, hop: int,
        n_fft: int, power: float, dtype: str, batch_size: int, workers: int, engine: str = "local",
        cluster_address: str | None = None) -> pd.DataFrame:
    """All extract shards -> spectrogram shards + index.csv. Returns the index.

    ``engine``/``cluster_address``: where the shards run (speech2face.engine); like
    batch_size and workers they change how fast, not what.
    """
    engines.check_engine(SECTION, engine, cluster_address)
    settings = SpectrogramSettings(seconds, sample_rate, window, hop, n_fft, power).validate()
    storage_dtype = check_storage_dtype(dtype)
    if batch_size < 1:
        raise ParamsError(f"params.yaml: spectrogram.batch_size = {batch_size!r}: expected an integer >= 1")
    if workers < 1:
        raise ParamsError(f"params.yaml: spectrogram.workers = {workers!r}: expected an integer >= 1")
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    if not extract_dir.is_dir():
        raise FileNotFoundError(f"{extract_dir} not found (run the extract stage first)")

    summary = StageSummary("spectrogram")
    # Shards made with other settings or other code cannot be reused: start over.
    # (batch_size and workers change how fast, not what, so they are left out.)
    shards.reset_if_config_changed(out_dir, {
        **settings.as_dict(), "dtype": dtype,
        "code": shards.code_fingerprint(sys.modules[__name__], audio, spectrograms)})
    remove_stale_temps(out_dir)
    plan = shards.list_shard_tables(extract_dir)
    shards.remove_unplanned(out_dir, [name for name, _ in plan])

    threads_before = torch.get_num_threads()
    torch.set_num_threads(workers)
    tables: dict[str, pd.DataFrame] = {}
    pending = {}
    try:
        total = sum(int((t["status"] == OK).sum()) for _, t in plan)
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(progress(None, "spectrogram", total=total))
            executor = None
            for name, extract_table in plan:
                clip_ids = list(extract_table.loc[extract_table["status"] == OK, "clip_id"])
                upstream_failed = len(extract_table) - len(clip_ids)
                if upstream_failed:
                    summary.skip("extract_failed", upstream_failed)
                table = _reusable_table(out_dir, name, clip_ids, settings, storage_dtype)
                if table is not None:
                    summary.reuse(len(table))
                    bar.update(len(table))
                    tables[name] = table
                    continue
                npz_path = extract_dir / f"{name}.npz"
                if executor is None:   # started only when there is work: a LocalCluster takes seconds
                    executor = stack.enter_context(engines.make_executor(
                        engine, cluster_address, workers, shared=[out_dir, npz_path]))
                here = executor.in_process
                pending[name] = executor.submit(
                    compute_shard, npz_path if here else npz_path.resolve(), out_dir if here else out_dir.resolve(),
                    name, clip_ids, settings, storage_dtype, batch_size, engines.progress_for_task(executor, bar))
            engines.collect_shard_tables(pending, executor, bar, summary, tables)
    finally:
        torch.set_num_threads(threads_before)

    index = (pd.concat([tables[name].assign(shard=name) for name, _ in plan], ignore_index=True) if plan
             else pd.DataFrame(columns=INDEX_COLUMNS))
    write_table(index[INDEX_COLUMNS], out_dir / "index.csv")
    summary.print()
    return index


def main() -> None:
    p = load_section(SECTION)
    engine, cluster_address = read_engine(p, SECTION)
    run(
        extract_dir=Path("data/extracted"),
        out_dir=Path("data/spectrograms"),
        seconds=get_float(p, SECTION, "seconds", minimum=0.05),
        sample_rate=get_int(p, SECTION, "sample_rate", minimum=1000),
        window=get_int(p, SECTION, "window", minimum=2),
        hop=get_int(p, SECTION, "hop", minimum=1),
        n_fft=get_int(p, SECTION, "n_fft", minimum=2),
        power=get_float(p, SECTION, "power", minimum=0.01),
        dtype=get_choice(p, SECTION, "dtype", STORAGE_DTYPES),
        batch_size=get_int(p, SECTION, "batch_size", minimum=1),
        workers=get_int(p, SECTION, "workers", minimum=1),
        engine=engine,
        cluster_address=cluster_address,
    )


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, EngineError, FileNotFoundError) as error:
        sys.exit(f"spectrogram: {error}")
