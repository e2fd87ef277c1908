"""The faces stage: extracted frames -> aligned face crops, landmarks and features, and the splits.

Files (format: speech2face.data.face_files) per extract shard, then ``index.csv`` with the
train/val/test split of every identity and ``meta.json``. The split is by the hash of the
identity (``split_by: video``), or takes the test split from a second AVSpeech-format CSV
(``split_by: csv``, AVSpeech's own held-out ``avspeech_test.csv``; see
speech2face.data.split). How faces are found, chosen, aligned and combined over frames:
speech2face.data.face_analysis; the feature networks: speech2face.data.face_backends.

``faces_shard`` is the unit of work (speech2face.core.runner). With the local engine the
shards run in this process, one after another, and their clips are analysed on ``workers``
crash-isolated processes that each load the dlib models once (``init_worker``); a clip
whose process dies is recorded as ``face_analysis_crashed``. With the dask engine each
shard is a cluster task that analyses its clips in turn in the worker's process.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd

from speech2face.core import engine as engines
from speech2face.core import shards
from speech2face.core.errors import DataError, MissingInputError
from speech2face.core.fsutil import atomic_path
from speech2face.core.params import bad_value, check, setting
from speech2face.core.runner import PoolSpec, Shard, ShardedConfig, ShardedStage, run_sharded
from speech2face.core.tables import FAILED, OK, SKIPPED, write_table
from speech2face.core.workers import WorkerPool, in_process_map
from speech2face.data import avspeech, extract_files, face_analysis, face_backends, face_files, split
from speech2face.data.face_analysis import DETECTORS, EMBED_FRAMES, ClipFaces, FaceAnalyzer, combine_features
from speech2face.data.face_backends import BACKENDS, FaceBackend, make_backend
from speech2face.data.face_files import INDEX_COLUMNS, N_LANDMARKS, TABLE_COLUMNS, array_path, expected_shapes
from speech2face.models.dlib import chips, file_format, network

SKIP_REASONS = ("no_face", "face_far_from_centre")   # skipped (the data), not failed (the code)
SPLIT_BY = ("video", "csv")   # video: hash of the video id | csv: test = the ids of faces.test_csv


@dataclass(frozen=True, kw_only=True)
class FacesConfig(ShardedConfig):
    SECTION: ClassVar[str] = "faces"
    detector: str = setting("hog", choices=DETECTORS)        # hog (fast) | cnn (paper's dlib CNN)
    upsample: int = setting(1, minimum=0, maximum=3,
                            expected="an integer from 0 to 3 (each step doubles the frame size)")
    detect_max_side: int | None = setting(640, minimum=64,
                                          expected="an integer >= 64, or null for no downscaling")
    max_centre_offset: float | None = setting(1.0, above=0,
                                              expected="a number > 0 (face box widths), or null for no limit")
    embed_frames: str = setting("middle", choices=EMBED_FRAMES)
    backend: str = setting("dlib128", choices=BACKENDS)      # dlib128 (offline) | vggface4096 (paper)
    vggface_weights: str | None = setting(None, expected="a path or null")
    crop_size: int = setting(224, minimum=32)
    split_fractions: tuple[float, ...] = setting((0.7, 0.1, 0.2), expected="[train, val, test] fractions")
    split_seed: int = setting(0)
    split_by: str = setting("video", choices=SPLIT_BY)
    test_csv: str = setting("data/sample/avspeech_sample_test.csv",
                            expected="the path of an AVSpeech-format CSV (youtube_id,start,end,x,y)")

    def check(self) -> None:
        super().check()
        section = self.SECTION
        if self.backend == "vggface4096":
            if not self.vggface_weights:
                raise bad_value(section, "vggface_weights", self.vggface_weights, "the path of a VGG-Face state "
                                "dict when backend is vggface4096 (no weights ship with this project)")
            if not Path(self.vggface_weights).is_file():
                raise bad_value(section, "vggface_weights", self.vggface_weights,
                                "an existing file (a VGG-Face state dict)")
            if self.crop_size != face_backends.VGGFACE_INPUT_SIZE:
                raise bad_value(section, "crop_size", self.crop_size, "224 with backend vggface4096 (VGG-Face's "
                                "input size)")
        try:
            split.check_fractions(self.split_fractions)
        except (TypeError, ValueError) as error:
            raise bad_value(section, "split_fractions", list(self.split_fractions),
                            f"[train, val, test] fractions ({error})") from None
        if self.split_by == "csv":
            check(Path(self.test_csv).is_file(), section, "test_csv", self.test_csv,
                  "an existing AVSpeech-format CSV (youtube_id,start,end,x,y) when split_by is csv")
            # test is what the CSV says; everybody else needs somewhere to go
            check(self.split_fractions[0] + self.split_fractions[1] > 0, section, "split_fractions",
                  list(self.split_fractions), "a train or val fraction > 0 when split_by is csv "
                  "(the test fraction is then ignored: the test CSV makes the test split)")

    def analyzer_settings(self) -> "AnalyzerSettings":
        in_worker = face_backends.backend_class(self.backend).in_worker
        return AnalyzerSettings(self.detector, self.upsample, self.crop_size, self.detect_max_side,
                                self.max_centre_offset, self.embed_frames,
                                worker_backend=self.backend if in_worker else None)


# ------------------------------------------------------------------ worker processes
# Each worker loads the dlib models once (``init_worker``) and keeps them in this slot.

@dataclass(frozen=True)
class AnalyzerSettings:
    detector: str = "hog"
    upsample: int = 1
    crop_size: int = 224
    detect_max_side: int | None = 640
    max_centre_offset: float | None = 1.0
    embed_frames: str = "middle"
    worker_backend: str | None = "dlib128"   # embedded inside the worker; None: by the caller

    def analyzer(self) -> FaceAnalyzer:
        return FaceAnalyzer(self.detector, self.upsample, self.crop_size, self.detect_max_side,
                            self.max_centre_offset)


_worker: tuple[FaceAnalyzer, FaceBackend | None, str] | None = None


def init_worker(settings: AnalyzerSettings) -> None:
    global _worker
    backend = make_backend(settings.worker_backend) if settings.worker_backend else None
    _worker = (settings.analyzer(), backend, settings.embed_frames)


def analyse_task(frames: list[np.ndarray] | str, x: float, y: float) -> ClipFaces:
    """One clip in a worker: its frames (or the reason they could not be read) -> its faces.

    Never raises for a bad clip: an error inside dlib becomes the clip's reason, so one
    strange frame cannot stop a shard.
    """
    if _worker is None:
        raise RuntimeError("analyse_task needs init_worker to run first in this process")
    analyzer, backend, embed_frames = _worker
    if isinstance(frames, str):
        return ClipFaces(faces=[], frames_examined=0, faces_in_frame=0, reason=frames)
    try:
        clip = analyzer.analyse_clip(frames, x, y, backend, embed_frames)
    except (RuntimeError, ValueError):
        clip = ClipFaces(faces=[], frames_examined=0, faces_in_frame=0, reason="face_analysis_error")
    for face in clip.faces:
        face.frame = None   # do not ship frames back to the parent process
    return clip


def crashed_clip(*_) -> ClipFaces:
    return ClipFaces(faces=[], frames_examined=0, faces_in_frame=0, reason="face_analysis_crashed")


def parent_backend(backend: str, vggface_weights: str | None) -> FaceBackend | None:
    """A backend too large for every worker (VGG-Face), built once per process; None for
    the small ones, which run inside the workers."""
    if face_backends.backend_class(backend).in_worker:
        return None
    return engines.once_per_process(("faces-backend", backend, tuple(_weights_fingerprint(vggface_weights) or ())),
                                    lambda: make_backend(backend, vggface_weights))


def _weights_fingerprint(path: str | None) -> list | None:
    if not path:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


# ------------------------------------------------------------------------- one shard

def finished_shard(out_dir: Path, shard: Shard, dim: int, crop_size: int) -> pd.DataFrame | None:
    """The shard's table if finished for exactly these clips and its arrays are intact."""
    table = shards.finished_table(out_dir, shard.name, shard.clip_ids)
    if table is None or list(table.columns) != TABLE_COLUMNS:
        return None
    n_ok = int((table["status"] == OK).sum())
    for kind, (shape, dtype) in expected_shapes(n_ok, dim, crop_size).items():
        try:
            array = np.load(array_path(out_dir, kind, shard.name), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.shape != shape or array.dtype != dtype:
            return None
    return table


def _clip_calls(source: extract_files.ExtractShard, xs: Sequence[float], ys: Sequence[float]) -> list[tuple]:
    """(frames or a failure reason, x, y) per clip: a frame that does not decode fails its
    clip, not the shard."""
    calls = []
    for i in range(len(source)):
        try:
            frames = source.frames(i)
        except (OSError, ValueError):
            frames = "undecodable_frame"
        calls.append((frames, float(xs[i]), float(ys[i])))
    return calls


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


def _analyse(calls: list[tuple], pool: WorkerPool | None, settings: AnalyzerSettings):
    if pool is not None:
        return pool.map(analyse_task, calls, on_crash=crashed_clip)
    init_worker(settings)   # cheap after the first call: the dlib models are cached per process
    return in_process_map(analyse_task, calls)


def _stored_rows(results: list[ClipFaces], dim: int, crop_size: int, timings: dict[str, float]
                 ) -> tuple[dict[str, np.ndarray], list[int], list[str], list[str]]:
    """The shard's arrays (usable clips only, in order) and each clip's row (-1 when not
    stored), status and reason; adds the usable clips' seconds per step to ``timings``."""
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
            statuses.append(SKIPPED if clip.reason in SKIP_REASONS else FAILED)
            reasons.append(clip.reason)
    return arrays, rows_out, statuses, reasons


def faces_shard(shard: Shard, out_dir: Path, pool: WorkerPool | None, bar, extract_dir: Path,
                config: FacesConfig) -> tuple[pd.DataFrame, dict[str, float]]:
    """Faces of one extract shard -> arrays + table (written last). Returns (table, seconds
    per step summed over its clips). A shard whose input is missing or inconsistent is
    reported in the table returned but not written, so a later run retries it."""
    clip_ids, identities = shard.clip_ids, list(shard.rows["youtube_id"])
    dim, crop_size = face_backends.backend_class(config.backend).dim, config.crop_size
    npz_path = Path(extract_dir) / f"{shard.name}.npz"
    timings: dict[str, float] = {}

    def unwritten(reason: str) -> tuple[pd.DataFrame, dict[str, float]]:
        bar.update(len(clip_ids))
        return pd.DataFrame({"clip_id": clip_ids, "identity": identities, "row": -1, "status": FAILED,
                             "reason": reason, "frames_examined": 0, "frames_with_face": 0,
                             "faces_in_frame": 0}, columns=TABLE_COLUMNS), timings

    source = None
    if clip_ids:
        source, problem = extract_files.open_for_clips(npz_path, clip_ids)
        if source is None:
            return unwritten(problem)

    results: list[ClipFaces] = []
    if source is not None:
        calls = _clip_calls(source, shard.rows["x"].to_numpy(), shard.rows["y"].to_numpy())
        # dlib's networks keep per-call state: one shard at a time per process, even on a
        # dask worker started with several threads.
        with engines.once_per_process("faces-shard-lock", threading.Lock) if pool is None else nullcontext():
            for clip in _analyse(calls, pool, config.analyzer_settings()):
                results.append(clip)
                bar.update(1)
            large_backend = parent_backend(config.backend, config.vggface_weights)
            if large_backend is not None:
                _embed_in_parent(results, large_backend)

    arrays, rows_out, statuses, reasons = _stored_rows(results, dim, crop_size, timings)
    face_files.save_arrays(out_dir, shard.name, arrays)
    table = pd.DataFrame({
        "clip_id": clip_ids, "identity": identities, "row": rows_out, "status": statuses,
        "reason": reasons,
        "frames_examined": [clip.frames_examined for clip in results],
        "frames_with_face": [len(clip.faces) for clip in results],
        "faces_in_frame": [clip.faces_in_frame for clip in results],
    }, columns=TABLE_COLUMNS)
    shards.write_shard_table(out_dir, shard.name, table)  # last: marks the shard done
    return table, timings


# ------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class CsvTestSplit:
    """The test split of ``split_by: csv``: the video ids of an AVSpeech-format CSV."""
    path: str
    ids: frozenset[str]
    unusable_rows: int   # rows the CSV reader refused (BadRow): they name no test id
    sha256: str          # of the file, for meta.json: another test CSV is another output


def read_test_split(path: str | Path) -> CsvTestSplit:
    ids, unusable = set(), 0
    digest = hashlib.sha256()
    try:
        for row in avspeech.iter_csv(path):
            if isinstance(row, avspeech.ClipRow):
                ids.add(row.youtube_id)
            else:
                unusable += 1
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise MissingInputError(f"faces.test_csv {path}: cannot read it ({error.strerror or error})") from None
    if not ids:
        raise DataError(f"faces.test_csv {path} has no usable AVSpeech row (youtube_id,start,end,x,y; "
                        f"{unusable} unusable)")
    return CsvTestSplit(str(path), frozenset(ids), unusable, digest.hexdigest())


def check_csv_split(identities: set[str], test_split: CsvTestSplit, fractions: Sequence[float],
                    which: str) -> None:
    """Refuse a test split from the CSV that leaves test, or train, empty.

    The hash split moves an identity into an empty test split (speech2face.data.split); the
    CSV split cannot, or a person of the training videos could be tested on. An empty test
    split means the download CSV lacks the test CSV's rows (the usual slip: downloading
    avspeech_train.csv alone), and the run would go on for hours before evaluate found no
    test pairs: say so here, once before the face work and once after it (its clips may have
    no usable face). No identity at all is another stage's problem; it passes here."""
    if not identities:
        return
    in_test = identities & test_split.ids
    if not in_test:
        raise DataError(f"none of the {len(identities)} {which} is in faces.test_csv {test_split.path} "
                        f"({len(test_split.ids)} ids), so the test split would be empty: the download CSV "
                        f"needs the test CSV's rows too (cat avspeech_train.csv avspeech_test.csv > all.csv)")
    if fractions[0] > 0 and in_test == identities:
        raise DataError(f"all {len(identities)} {which} are in faces.test_csv {test_split.path}, so nothing is "
                        f"left to train on: the download CSV needs training rows besides the test CSV's")


def split_column(index: pd.DataFrame, fractions: Sequence[float], seed: int,
                 test_ids: frozenset[str] | None = None) -> list[str]:
    """Split of each row's identity: by hash, or with ``test_ids`` the ids of the test CSV
    in test and the others by hash into train/val. The non-empty guarantees
    (speech2face.data.split) are applied among identities with at least one usable face, so
    that they guarantee data; identities without one follow the plain rule."""
    usable = sorted(set(index.loc[index["status"] == OK, "identity"]))
    fractions = split.check_fractions(fractions)
    if test_ids is None:
        assigned = split.assign_splits(usable, fractions, seed)
    else:
        assigned = split.assign_splits_by_test_ids(usable, test_ids, fractions, seed)

    def plain_rule(identity: str) -> str:
        u = split.identity_unit(identity, seed)
        if test_ids is None:
            return split.split_of_unit(u, fractions)
        return "test" if identity in test_ids else split.split_outside_test(u, fractions)

    return [assigned.get(identity) or plain_rule(identity) for identity in index["identity"]]


def run_faces(extract_dir: Path, out_dir: Path, config: FacesConfig) -> pd.DataFrame:
    """All extract shards -> face shards + index.csv + meta.json. Returns the index."""
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    planned = extract_files.downstream_shards(extract_dir)
    backend_class = face_backends.backend_class(config.backend)
    test_split = read_test_split(config.test_csv) if config.split_by == "csv" else None
    if test_split is not None:
        videos = {str(identity) for shard in planned for identity in shard.rows["youtube_id"]}
        check_csv_split(videos, test_split, config.split_fractions, "videos the extract stage could use")
    # A large backend (VGG-Face) is built here once, which also checks its weights
    # (BackendError) before any work; the small ones are built inside the workers.
    parent_backend(config.backend, config.vggface_weights)
    stage = ShardedStage(
        "faces", out_dir, shards=planned, work=faces_shard, args=(extract_dir, config), settings=config,
        reuse=lambda folder, shard: finished_shard(folder, shard, backend_class.dim, config.crop_size),
        upstream_failure="extract_failed", pool=PoolSpec(init_worker, (config.analyzer_settings(),)),
        shared=[Path(config.vggface_weights)] if config.vggface_weights else [],
        # workers and the engine change how fast, not what; the split is applied after
        config={"detector": config.detector, "upsample": config.upsample, "backend": config.backend,
                "vggface_weights": _weights_fingerprint(config.vggface_weights), "crop_size": config.crop_size,
                "embed_frames": config.embed_frames, "detect_max_side": config.detect_max_side,
                "max_centre_offset": config.max_centre_offset,
                "code": shards.code_fingerprint(sys.modules[__name__], face_analysis, face_backends, face_files,
                                                file_format, network, chips)})
    done = run_sharded(stage, TABLE_COLUMNS + ["shard"])
    index = done.index
    test_ids = test_split.ids if test_split is not None else None
    index["split"] = split_column(index, config.split_fractions, config.split_seed, test_ids) if len(index) else []
    if test_split is not None:
        usable = {str(identity) for identity in index.loc[index["status"] == OK, "identity"]}
        check_csv_split(usable, test_split, config.split_fractions, "identities with a usable face")
    write_table(index[INDEX_COLUMNS], out_dir / "index.csv")
    _print_timings(done.extras.values())
    meta = {
        "backend": config.backend, "dim": backend_class.dim, "normalised": backend_class.normalised,
        "crop_size": config.crop_size, "landmarks": N_LANDMARKS, "detector": config.detector,
        "upsample": config.upsample, "embed_frames": config.embed_frames,
        "canonical_points": np.round(face_analysis.CANONICAL_POINTS * config.crop_size, 3).tolist(),
        "split_fractions": list(config.split_fractions), "split_seed": config.split_seed,
        "split_by": config.split_by,
    }
    if test_split is not None:
        meta.update(test_csv_sha256=test_split.sha256, test_csv_ids=len(test_split.ids))
        _print_csv_split(index, test_split)
    with atomic_path(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    done.summary.print()
    return index


def _print_csv_split(index: pd.DataFrame, test_split: CsvTestSplit) -> None:
    """What the test CSV gave, and the rows it could not use (they name no test id)."""
    usable = index[index["status"] == OK].drop_duplicates("identity")
    counts = usable["split"].value_counts()
    print(f"faces: test split from {test_split.path}: {len(test_split.ids)} ids, "
          f"{test_split.unusable_rows} unusable rows; identities with a usable face: "
          + ", ".join(f"{name} {int(counts.get(name, 0))}" for name in split.SPLITS), flush=True)


def _print_timings(per_shard) -> None:
    """Seconds per clip of each step. Printed, not stored: data/faces is a DVC output, and a
    file that changes with machine load would make every rerun look like new data."""
    timings: dict[str, float] = {}
    for seconds in per_shard:
        for key, value in seconds.items():
            timings[key] = timings.get(key, 0.0) + value
    clips_timed = int(timings.pop("clips", 0))
    if clips_timed:
        print("faces: seconds per clip: " + ", ".join(f"{k} {v / clips_timed:.4f}" for k, v in sorted(timings.items())),
              flush=True)
