"""DVC stage: extracted frames (data/extracted/) -> aligned faces + face features (data/faces/).

Per extract shard ``shard-NNNNN`` (only the clips the extract stage could use):
  features-NNNNN.npy    (n_ok, dim) float32   face feature of each usable clip (see meta.json)
  crops-NNNNN.npy       (n_ok, S, S, 3) uint8 aligned RGB face crop (S = crop_size)
  landmarks-NNNNN.npy   (n_ok, 68, 2) float32 dlib's 68 landmarks (x, y) in crop pixels
  shard-NNNNN.csv       clip_id, identity, row (index into the arrays; -1 when skipped),
                        status, reason (no_face | face_far_from_centre | ...),
                        frames_examined, frames_with_face (among those examined),
                        faces_in_frame (most faces the detector found in one examined frame)
and at the end:
  index.csv             all shard tables in order + ``shard`` + ``split`` (train/val/test by
                        identity = YouTube video id; speech2face.split)
  meta.json             backend, dim, crop size, detector settings, measured seconds per clip
  config.json           params + code fingerprint the shards were made with: a change wipes them

How faces are found, chosen, aligned and how several frames combine: speech2face.faces.
``process_shard`` is the unit of work. With the local engine the shards run in this process,
one after another, and their clips are analysed in a process pool (``workers``), in order;
with the dask engine each shard is a cluster task (``_shard_on_worker``) that analyses its
clips in turn (speech2face.engine). A shard whose table exists and whose arrays fit is
reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from speech2face import engine as engines, extracted, face_backends, faces, shards, split  # noqa: E402
from speech2face.engine import EngineError, read_engine  # noqa: E402
from speech2face.face_backends import BACKENDS, BackendError, FaceBackend, make_backend  # noqa: E402
from speech2face.faces import (DETECTORS, EMBED_FRAMES, N_LANDMARKS, AnalyzerSettings,  # noqa: E402
                               ClipFaces, analyse_task, combine_features, init_worker)
from speech2face.fsutil import atomic_path, remove_stale_temps  # noqa: E402
from speech2face.params import (ParamsError, get_choice, get_float, get_int,  # noqa: E402
                                load_section)
from speech2face.reporting import StageSummary, progress  # noqa: E402
from speech2face.tables import OK, SKIPPED, FAILED, write_table  # noqa: E402

SECTION = "faces"
TABLE_COLUMNS = ["clip_id", "identity", "row", "status", "reason", "frames_examined",
                 "frames_with_face", "faces_in_frame"]
INDEX_COLUMNS = TABLE_COLUMNS + ["shard", "split"]
ARRAYS = ("features", "crops", "landmarks")


def array_path(out_dir: Path, kind: str, shard: str) -> Path:
    return Path(out_dir) / f"{kind}-{shard.removeprefix('shard-')}.npy"


def expected_shapes(n_ok: int, dim: int, crop_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"features": ((n_ok, dim), np.dtype(np.float32)),
            "crops": ((n_ok, crop_size, crop_size, 3), np.dtype(np.uint8)),
            "landmarks": ((n_ok, N_LANDMARKS, 2), np.dtype(np.float32))}


# ------------------------------------------------------------------------- checks

def check_params(detector: str, upsample: int, backend: str, vggface_weights: str | None, crop_size: int,
                 workers: int, split_fractions: Sequence[float], split_seed: int, embed_frames: str,
                 detect_max_side: int | None, max_centre_offset: float | None) -> None:
    """ParamsError (one line) for any value the stage cannot work with."""
    def bad(key: str, value, expected: str) -> None:
        raise ParamsError(f"params.yaml: {SECTION}.{key} = {value!r}: expected {expected}")

    if detector not in DETECTORS:
        bad("detector", detector, f"one of {list(DETECTORS)}")
    if not isinstance(upsample, int) or not 0 <= upsample <= 3:
        bad("upsample", upsample, "an integer from 0 to 3 (each step doubles the frame size)")
    if backend not in BACKENDS:
        bad("backend", backend, f"one of {list(BACKENDS)}")
    if not isinstance(crop_size, int) or crop_size < 32:
        bad("crop_size", crop_size, "an integer >= 32")
    if backend == "vggface4096":
        if not vggface_weights:
            bad("vggface_weights", vggface_weights, "the path of a VGG-Face state dict when backend is "
                "vggface4096 (no weights ship with this project)")
        if not Path(vggface_weights).is_file():
            bad("vggface_weights", vggface_weights, "an existing file (a VGG-Face state dict)")
        if crop_size != face_backends.VGGFACE_INPUT_SIZE:
            bad("crop_size", crop_size, "224 with backend vggface4096 (VGG-Face's input size)")
    if not isinstance(workers, int) or workers < 1:
        bad("workers", workers, "an integer >= 1")
    try:
        split.check_fractions(split_fractions)
    except (TypeError, ValueError) as error:
        bad("split_fractions", split_fractions, f"[train, val, test] fractions ({error})")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        bad("split_seed", split_seed, "an integer")
    if embed_frames not in EMBED_FRAMES:
        bad("embed_frames", embed_frames, f"one of {list(EMBED_FRAMES)}")
    if detect_max_side is not None and (not isinstance(detect_max_side, int) or detect_max_side < 64):
        bad("detect_max_side", detect_max_side, "an integer >= 64, or null for no downscaling")
    if max_centre_offset is not None and not (isinstance(max_centre_offset, (int, float))
                                              and max_centre_offset > 0):
        bad("max_centre_offset", max_centre_offset, "a number > 0 (face box widths), or null for no limit")


def _weights_fingerprint(path: str | None) -> list | None:
    if not path:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------------- one shard

def _reusable_table(out_dir: Path, shard: str, clip_ids: list[str], dim: int, crop_size: int
                    ) -> pd.DataFrame | None:
    """The shard's table if finished for exactly these clips and its arrays are intact."""
    table = shards.finished_table(out_dir, shard, clip_ids)
    if table is None or list(table.columns) != TABLE_COLUMNS:
        return None
    n_ok = int((table["status"] == OK).sum())
    for kind, (shape, dtype) in expected_shapes(n_ok, dim, crop_size).items():
        try:
            array = np.load(array_path(out_dir, kind, shard), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.shape != shape or array.dtype != dtype:
            return None
    return table


def _tasks(source: extracted.ExtractShard, xs: Sequence[float], ys: Sequence[float]
           ) -> Iterator[tuple[list[np.ndarray] | str, float, float]]:
    """Decoded frames per clip, decoded as the pool takes them (one shard in flight at a time).

    A frame that does not decode makes its clip fail with a reason, not the shard."""
    for i in range(len(source)):
        try:
            frames = source.frames(i)
        except (OSError, ValueError):
            frames = "undecodable_frame"
        yield frames, float(xs[i]), float(ys[i])


def _embed_in_parent(results: list[ClipFaces], backend: FaceBackend) -> None:
    """For backends too large for every worker (VGG-Face): all crops of the shard in batches."""
    usable = [clip for clip in results if clip.ok]
    if not usable:
        return
    started = time.perf_counter()
    crops = np.stack([face.crop for clip in usable for face in clip.faces])
    features = backend.embed_crops(crops)
    share = (time.perf_counter() - started) / len(usable)
    start = 0
    for clip in usable:
        count = len(clip.faces)
        clip.feature = combine_features(features[start:start + count], backend.normalised)
        clip.seconds["embed"] = clip.seconds.get("embed", 0.0) + share
        start += count


def process_shard(npz_path: Path, out_dir: Path, shard: str, rows: pd.DataFrame,
                  analyse: Callable[[Iterator], Iterator[ClipFaces]], dim: int,
                  parent_backend: FaceBackend | None, crop_size: int, bar,
                  timings: dict[str, float]) -> pd.DataFrame:
    """Faces of one extract shard -> arrays + table (written last). A shard whose input is
    missing or inconsistent is reported in the table returned but not written, so a later
    run retries it."""
    clip_ids = list(rows["clip_id"])
    identities = list(rows["youtube_id"])

    def unwritten(reason: str) -> pd.DataFrame:
        bar.update(len(clip_ids))
        return pd.DataFrame({"clip_id": clip_ids, "identity": identities, "row": -1, "status": FAILED,
                             "reason": reason, "frames_examined": 0, "frames_with_face": 0,
                             "faces_in_frame": 0}, columns=TABLE_COLUMNS)

    if clip_ids and not npz_path.exists():
        return unwritten("missing_extract_shard")
    source = extracted.load_shard(npz_path) if clip_ids else None
    if source is not None and source.clip_ids != clip_ids:
        return unwritten("extract_shard_mismatch")

    results: list[ClipFaces] = []
    if source is not None:
        for clip in analyse(_tasks(source, rows["x"].to_numpy(), rows["y"].to_numpy())):
            results.append(clip)
            bar.update(1)
    if parent_backend is not None:
        _embed_in_parent(results, parent_backend)

    usable = [clip for clip in results if clip.ok]
    arrays = {
        "features": np.zeros((len(usable), dim), np.float32),
        "crops": np.zeros((len(usable), crop_size, crop_size, 3), np.uint8),
        "landmarks": np.zeros((len(usable), N_LANDMARKS, 2), np.float32),
    }
    rows_out, statuses, reasons = [], [], []
    r = 0
    for clip in results:
        if clip.ok:
            arrays["features"][r] = clip.feature
            arrays["crops"][r] = clip.representative.crop
            arrays["landmarks"][r] = clip.representative.landmarks
            rows_out.append(r)
            r += 1
            statuses.append(OK)
            reasons.append("")
            for key, seconds in clip.seconds.items():
                timings[key] = timings.get(key, 0.0) + seconds
            timings["clips"] = timings.get("clips", 0) + 1
        else:
            rows_out.append(-1)
            statuses.append(SKIPPED if clip.reason in ("no_face", "face_far_from_centre") else FAILED)
            reasons.append(clip.reason)
    for kind, array in arrays.items():
        with atomic_path(array_path(out_dir, kind, shard)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
    table = pd.DataFrame({
        "clip_id": clip_ids, "identity": identities, "row": rows_out, "status": statuses,
        "reason": reasons,
        "frames_examined": [clip.frames_examined for clip in results],
        "frames_with_face": [len(clip.faces) for clip in results],
        "faces_in_frame": [clip.faces_in_frame for clip in results],
    }, columns=TABLE_COLUMNS)
    shards.write_shard_table(out_dir, shard, table)  # last: marks the shard done
    return table


def _shard_here(npz_path: Path, out_dir: Path, shard: str, rows: pd.DataFrame, pool: "_Workers | None", dim: int,
                parent_backend: FaceBackend | None, crop_size: int, bar) -> tuple[pd.DataFrame, dict[str, float]]:
    """``process_shard`` in this process, its clips on the stage's pool (local engine)."""
    timings: dict[str, float] = {}
    table = process_shard(npz_path, out_dir, shard, rows, pool, dim, parent_backend, crop_size, bar, timings)
    return table, timings


def _shard_on_worker(npz_path: Path, out_dir: Path, shard: str, rows: pd.DataFrame, settings: AnalyzerSettings,
                     backend: str, vggface_weights: str | None, dim: int, crop_size: int
                     ) -> tuple[pd.DataFrame, dict[str, float]]:
    """``process_shard`` as a dask task: the clips of the shard in turn, in this worker
    process. Returns (table, seconds per step summed over its clips)."""
    # dlib's networks keep per-call state: one shard at a time per process, even on a
    # worker started with several threads.
    with engines.once_per_process("faces-shard-lock", threading.Lock):
        init_worker(settings)   # cheap after the first call: the dlib models are cached per process
        parent_backend = None
        if settings.worker_backend is None:   # a large backend (VGG-Face): once per worker, not per shard
            parent_backend = engines.once_per_process(
                ("faces-backend", backend, tuple(_weights_fingerprint(vggface_weights) or ())),
                lambda: make_backend(backend, vggface_weights))
        timings: dict[str, float] = {}
        table = process_shard(npz_path, out_dir, shard, rows, lambda tasks: map(analyse_task, tasks), dim,
                              parent_backend, crop_size, engines.NO_PROGRESS, timings)
    return table, timings


# ------------------------------------------------------------------------- splits

def split_column(index: pd.DataFrame, fractions: Sequence[float], seed: int) -> list[str]:
    """Split of each row's identity. The non-empty train/test guarantee (speech2face.split)
    is applied among identities with at least one usable face, so that it guarantees data;
    identities without one follow the plain hash rule."""
    usable = sorted(set(index.loc[index["status"] == OK, "identity"]))
    assigned = split.assign_splits(usable, fractions, seed)
    fractions = split.check_fractions(fractions)
    return [assigned.get(identity) or split.split_of_unit(split.identity_unit(identity, seed), fractions)
            for identity in index["identity"]]


# --------------------------------------------------------------------------- run

def run(extract_dir: Path, out_dir: Path, detector: str = "hog", upsample: int = 1,
        backend: str = "dlib128", vggface_weights: str | None = None, crop_size: int = 224,
        workers: int = 2, split_fractions: Sequence[float] = (0.7, 0.1, 0.2), split_seed: int = 0,
        embed_frames: str = "middle", detect_max_side: int | None = 640,
        max_centre_offset: float | None = 1.0, engine: str = "local",
        cluster_address: str | None = None) -> pd.DataFrame:
    """All extract shards -> face shards + index.csv + meta.json. Returns the index.

    ``engine``/``cluster_address``: where the shards run (speech2face.engine); like
    ``workers`` they change how fast, not what.
    """
    check_params(detector, upsample, backend, vggface_weights, crop_size, workers, split_fractions,
                 split_seed, embed_frames, detect_max_side, max_centre_offset)
    engines.check_engine(SECTION, engine, cluster_address)
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    if not extract_dir.is_dir():
        raise FileNotFoundError(f"{extract_dir} not found (run the extract stage first)")
    backend_class = face_backends.backend_class(backend)
    # Small per-face backends run inside the workers; a large one (VGG-Face) is built once
    # here, which also checks its weights (BackendError) before any work.
    parent_backend = None if backend_class.in_worker else make_backend(backend, vggface_weights)
    settings = AnalyzerSettings(detector, upsample, crop_size, detect_max_side, max_centre_offset,
                                embed_frames, worker_backend=backend if backend_class.in_worker else None)

    summary = StageSummary("faces")
    shards.reset_if_config_changed(out_dir, {
        "detector": detector, "upsample": upsample, "backend": backend,
        "vggface_weights": _weights_fingerprint(vggface_weights), "crop_size": crop_size,
        "embed_frames": embed_frames, "detect_max_side": detect_max_side,
        "max_centre_offset": max_centre_offset,
        "code": shards.code_fingerprint(faces, face_backends),
        "stage_code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]})
    remove_stale_temps(out_dir)
    plan = shards.list_shard_tables(extract_dir)
    planned = {name for name, _ in plan}
    for path in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].npy"):
        if f"shard-{path.stem[-5:]}" not in planned:   # shards the extract stage no longer has
            path.unlink()
    shards.remove_unplanned(out_dir, sorted(planned))

    timings: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    pending = {}
    total = sum(int((t["status"] == OK).sum()) for _, t in plan)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress(None, "faces", total=total))
        executor = pool = None
        for name, extract_table in plan:
            rows = extract_table[extract_table["status"] == OK].reset_index(drop=True)
            upstream_failed = len(extract_table) - len(rows)
            if upstream_failed:
                summary.skip("extract_failed", upstream_failed)
            table = _reusable_table(out_dir, name, list(rows["clip_id"]), backend_class.dim, crop_size)
            if table is not None:
                summary.reuse(len(table))
                bar.update(len(table))
                tables[name] = table
                continue
            npz_path = extract_dir / f"{name}.npz"
            if executor is None:   # started only when there is work: a LocalCluster takes seconds
                executor = stack.enter_context(engines.make_executor(
                    engine, cluster_address, workers,
                    shared=[out_dir, npz_path] + ([Path(vggface_weights)] if vggface_weights else [])))
            if executor.in_process:
                if pool is None and len(rows):
                    pool = _start_workers(settings, workers)
                    stack.callback(pool.close)
                pending[name] = executor.submit(_shard_here, npz_path, out_dir, name, rows, pool, backend_class.dim,
                                                parent_backend, crop_size, bar)
            else:
                weights = str(Path(vggface_weights).resolve()) if vggface_weights else None
                pending[name] = executor.submit(_shard_on_worker, npz_path.resolve(), out_dir.resolve(), name, rows,
                                                settings, backend, weights, backend_class.dim, crop_size)
        results = engines.collect_shard_tables(pending, executor, bar, summary, tables,
                                               table_of=lambda result: result[0])
    for _, seconds in results.values():   # results: (table, seconds per step) per shard
        for key, value in seconds.items():
            timings[key] = timings.get(key, 0.0) + value

    index = (pd.concat([tables[name].assign(shard=name) for name, _ in plan], ignore_index=True) if plan
             else pd.DataFrame(columns=TABLE_COLUMNS + ["shard"]))
    index["split"] = split_column(index, split_fractions, split_seed) if len(index) else []
    write_table(index[INDEX_COLUMNS], out_dir / "index.csv")
    clips_timed = int(timings.pop("clips", 0))
    # Timings are printed, not stored: data/faces is a DVC output, and a file that changes
    # with machine load would make every rerun look like new data and retrain the encoder.
    if clips_timed:
        print("faces: seconds per clip: " + ", ".join(f"{k} {v / clips_timed:.4f}" for k, v in sorted(timings.items())),
              flush=True)
    meta = {
        "backend": backend, "dim": backend_class.dim, "normalised": backend_class.normalised,
        "crop_size": crop_size, "landmarks": N_LANDMARKS, "detector": detector, "upsample": upsample,
        "embed_frames": embed_frames, "canonical_points": np.round(faces.CANONICAL_POINTS * crop_size, 3).tolist(),
        "split_fractions": list(split_fractions), "split_seed": split_seed,
    }
    with atomic_path(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    summary.print()
    return index


class _Workers:
    """``workers`` processes (spawned: no inherited threads or torch state) or, for one
    worker, the calling process itself; either way results come back in input order.

    A process pool of concurrent.futures, not multiprocessing.Pool: if a worker cannot
    start (its initializer fails), the run stops with an error instead of respawning
    failing workers forever.
    """

    def __init__(self, settings: AnalyzerSettings, workers: int):
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(settings,))
        else:
            init_worker(settings)

    def __call__(self, tasks: Iterator) -> Iterator[ClipFaces]:
        if self._pool is None:
            return map(analyse_task, tasks)
        return self._pool.map(analyse_task, tasks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _start_workers(settings: AnalyzerSettings, workers: int) -> _Workers:
    return _Workers(settings, workers)


def main() -> None:
    p = load_section(SECTION)
    fractions = p.get("split_fractions")
    if not (isinstance(fractions, list) and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                 for f in fractions)):
        raise ParamsError(f"params.yaml: {SECTION}.split_fractions = {fractions!r}: expected [train, val, test]")
    engine, cluster_address = read_engine(p, SECTION)
    weights = p.get("vggface_weights")
    if weights is not None and not isinstance(weights, str):
        raise ParamsError(f"params.yaml: {SECTION}.vggface_weights = {weights!r}: expected a path or null")
    run(
        extract_dir=Path("data/extracted"),
        out_dir=Path("data/faces"),
        detector=get_choice(p, SECTION, "detector", DETECTORS),
        upsample=get_int(p, SECTION, "upsample", minimum=0),
        backend=get_choice(p, SECTION, "backend", BACKENDS),
        vggface_weights=weights,
        crop_size=get_int(p, SECTION, "crop_size", minimum=32),
        workers=get_int(p, SECTION, "workers", minimum=1),
        split_fractions=fractions,
        split_seed=get_int(p, SECTION, "split_seed"),
        embed_frames=get_choice(p, SECTION, "embed_frames", EMBED_FRAMES),
        detect_max_side=get_int(p, SECTION, "detect_max_side", minimum=64, allow_none=True),
        max_centre_offset=(None if p.get("max_centre_offset") is None
                           else get_float(p, SECTION, "max_centre_offset", minimum=0.01)),
        engine=engine,
        cluster_address=cluster_address,
    )


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, BackendError, EngineError, FileNotFoundError) as error:
        sys.exit(f"faces: {error}")
    except BrokenProcessPool as error:
        sys.exit(f"faces: a worker process died or could not start ({error}); rerun resumes finished shards")
