"""The faces stage on extract shards built from real photos, and the identity split."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from speech2face.data import extract_files as extracted
from speech2face.data import split
from speech2face.data.face_backends import make_backend
from speech2face.data.face_analysis import FaceAnalyzer
from speech2face.core.errors import DataError, MissingInputError
from speech2face.core.params import ParamsError, build_config
from speech2face.data import face_files
from speech2face.core import engine as engines
from speech2face.core.workers import WorkerPool
from speech2face.data.extract_files import downstream_shards
from speech2face.data.faces import (FacesConfig, analyse_task, check_csv_split, crashed_clip, faces_shard,
                                    init_worker, read_test_split, run_faces, split_column)
from speech2face.core.tables import read_table

ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT.parent / "shared" / "media" / "faces"
needs_media = pytest.mark.skipif(not FACES.is_dir(), reason=f"real media folder {FACES} absent")

DEFAULTS = dict(detector="hog", upsample=1, backend="dlib128", vggface_weights=None, crop_size=224,
                workers=2, split_fractions=[0.7, 0.1, 0.2], split_seed=0)


def _config(**changes) -> FacesConfig:
    """The faces section as the stage builds it (checked), with ``changes``."""
    return build_config(FacesConfig, {**DEFAULTS, **changes})


# ------------------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_near_the_fractions() -> None:
    ids = [f"vid{i:05d}" for i in range(1000)]
    splits = split.assign_splits(ids, (0.7, 0.1, 0.2), seed=0)
    assert splits == split.assign_splits(list(reversed(ids)), (0.7, 0.1, 0.2), seed=0)
    assert set(splits) == set(ids) and set(splits.values()) == {"train", "val", "test"}
    counts = pd.Series(splits).value_counts(normalize=True)
    # binomial standard deviation sqrt(0.7*0.3/1000) = 0.0145: 3.5 sd
    assert abs(counts["train"] - 0.7) < 0.05 and abs(counts["val"] - 0.1) < 0.035
    assert abs(counts["test"] - 0.2) < 0.045
    other_seed = split.assign_splits(ids, (0.7, 0.1, 0.2), seed=1)
    assert 0.3 < np.mean([splits[i] != other_seed[i] for i in ids]) < 0.7


def test_split_is_stable_when_identities_come_and_go() -> None:
    ids = [f"vid{i:05d}" for i in range(1000)]
    before = split.assign_splits(ids, (0.7, 0.1, 0.2), seed=3)
    grown = split.assign_splits(ids + [f"new{i}" for i in range(500)], (0.7, 0.1, 0.2), seed=3)
    shrunk = split.assign_splits(ids[300:], (0.7, 0.1, 0.2), seed=3)
    assert all(grown[i] == before[i] for i in ids)
    assert all(shrunk[i] == before[i] for i in ids[300:])


def test_split_unit_is_uniform() -> None:
    units = np.array([split.identity_unit(f"id{i}", 0) for i in range(4000)])
    assert units.min() >= 0 and units.max() < 1
    histogram, _ = np.histogram(units, bins=10, range=(0, 1))
    assert histogram.min() > 330 and histogram.max() < 470   # 400 expected per bin


def test_tiny_sets_still_get_train_and_test() -> None:
    fractions = (0.7, 0.1, 0.2)
    # find three ids that the plain hash puts all in train (happens for ~1/3 of triples)
    for start in range(0, 300, 3):
        ids = [f"t{start + k}" for k in range(3)]
        if all(split.split_of_unit(split.identity_unit(i, 0), fractions) == "train" for i in ids):
            break
    else:
        pytest.fail("no all-train triple found")
    splits = split.assign_splits(ids, fractions, 0)
    largest = max(ids, key=lambda i: split.identity_unit(i, 0))
    assert splits[largest] == "test"
    assert sorted(splits.values()) == ["test", "train", "train"]
    # everything hashed into test: the smallest u moves to train
    splits = split.assign_splits(ids, (0.01, 0.0, 0.99), 0)
    smallest = min(ids, key=lambda i: split.identity_unit(i, 0))
    assert splits[smallest] == "train" and sorted(splits.values()) == ["test", "test", "train"]
    # two identities: no guarantee is promised, the hash rule stands
    assert split.assign_splits(ids[:2], fractions, 0) == {i: "train" for i in ids[:2]}


def test_bad_split_fractions() -> None:
    for bad in ([0.7, 0.3], [0.5, 0.5, 0.5], [1.2, -0.1, -0.1], [float("nan"), 0.5, 0.5]):
        with pytest.raises(ValueError, match="split fractions"):
            split.check_fractions(bad)


def _index(identities: list[str], statuses: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"identity": identities, "status": statuses})


def test_split_column_by_video_is_the_hash_split_of_the_usable_identities() -> None:
    ids = [f"vid{i:03d}" for i in range(200)]
    index = _index(ids + ids[:50] + ["gone1", "gone2"], ["ok"] * 200 + ["failed"] * 52)
    expected = split.assign_splits(ids, (0.7, 0.1, 0.2), 0)
    column = split_column(index, [0.7, 0.1, 0.2], 0)
    assert column[:250] == [expected[i] for i in ids + ids[:50]]
    assert column[250:] == [split.split_of_unit(split.identity_unit(i, 0), (0.7, 0.1, 0.2)) for i in ("gone1", "gone2")]


def test_split_column_by_csv_puts_every_test_id_in_test() -> None:
    ids = [f"vid{i:03d}" for i in range(200)]
    test_ids = frozenset(ids[::5] + ["gone1", "elsewhere"])   # gone1: in the index, no usable face
    index = _index(ids + ["gone1", "gone2"], ["ok"] * 200 + ["skipped", "failed"])
    column = dict(zip(index["identity"], split_column(index, [0.7, 0.1, 0.2], 0, test_ids)))
    assert {i for i, s in column.items() if s == "test"} == set(ids[::5]) | {"gone1"}
    assert column == {**split.assign_splits_by_test_ids(ids, test_ids, (0.7, 0.1, 0.2), 0),
                      "gone1": "test", "gone2": split.split_outside_test(split.identity_unit("gone2", 0),
                                                                         (0.7, 0.1, 0.2))}
    # the train guarantee counts usable identities only: one usable identity outside the
    # list, hashed into val, moves to train even though an unusable one is in train
    in_val = next(i for i in (f"v{k}" for k in range(400)) if split.identity_unit(i, 0) >= 0.875)
    in_train = next(i for i in (f"w{k}" for k in range(400)) if split.identity_unit(i, 0) < 0.875)
    small = _index(["t1", in_val, in_train], ["ok", "ok", "failed"])
    assert split_column(small, [0.7, 0.1, 0.2], 0, frozenset({"t1"})) == ["test", "train", "train"]


def test_test_csv_ids_bad_rows_and_hash(tmp_path) -> None:
    path = tmp_path / "test.csv"
    path.write_text("aaaaaaaaaaa,0,3,0.5,0.5\naaaaaaaaaaa,4,6,0.5,0.5\n\n-bbbbbbbbbb,1,2,0.4,0.6\n"
                    "../../etc/passwd,0,1,0.5,0.5\nccccccccccc,5,1,0.5,0.5\nshort,row\n")
    test_split = read_test_split(path)
    assert test_split.ids == {"aaaaaaaaaaa", "-bbbbbbbbbb"}
    assert test_split.unusable_rows == 3   # unsafe id, end before start, 2 fields
    assert test_split.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text("youtube_id,start,end,x,y\n")   # a header and nothing else
    with pytest.raises(DataError, match="has no usable AVSpeech row .*1 unusable"):
        read_test_split(path)
    with pytest.raises(MissingInputError, match="faces.test_csv"):
        read_test_split(tmp_path / "absent.csv")


def test_csv_split_refuses_an_empty_test_or_train(tmp_path) -> None:
    path = tmp_path / "test.csv"
    path.write_text("aaaaaaaaaaa,0,3,0.5,0.5\nbbbbbbbbbbb,0,3,0.5,0.5\n")
    test_split = read_test_split(path)
    check_csv_split({"aaaaaaaaaaa", "ccccccccccc"}, test_split, (0.7, 0.1, 0.2), "videos")
    check_csv_split(set(), test_split, (0.7, 0.1, 0.2), "videos")   # no data: another stage's error
    with pytest.raises(DataError) as caught:
        check_csv_split({"ccccccccccc", "ddddddddddd"}, test_split, (0.7, 0.1, 0.2), "videos")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "none of the 2 videos" in message
    assert "cat avspeech_train.csv avspeech_test.csv > all.csv" in message
    with pytest.raises(DataError, match="all 2 videos are in faces.test_csv .*nothing is left to train on"):
        check_csv_split({"aaaaaaaaaaa", "bbbbbbbbbbb"}, test_split, (0.7, 0.1, 0.2), "videos")
    check_csv_split({"aaaaaaaaaaa", "bbbbbbbbbbb"}, test_split, (0.0, 0.5, 0.5), "videos")   # no train wanted


# ------------------------------------------------------------------------- stage

def _photo(name: str) -> np.ndarray:
    image = Image.open(FACES / name).convert("RGB")
    image.thumbnail((640, 640), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _write_extract_shard(folder: Path, name: str, clips: list[tuple[str, str, list, float, float]],
                         failed: list[tuple[str, str]] = ()) -> None:
    """An extract stage shard: npz of the clips that succeeded + the table of all clips."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [c[0] for c in clips]
    extracted.save_shard(folder / f"{name}.npz", ids, [np.zeros(160, np.int16) for _ in clips],
                         [[f if isinstance(f, bytes) else extracted.encode_jpeg(f) for f in c[2]] for c in clips],
                         16000)
    table = pd.DataFrame({
        "clip_id": ids + [f[0] for f in failed],
        "youtube_id": [c[1] for c in clips] + [f[0].split("_")[0] for f in failed],
        "x": [c[3] for c in clips] + [0.5] * len(failed),
        "y": [c[4] for c in clips] + [0.5] * len(failed),
        "status": ["ok"] * len(clips) + ["failed"] * len(failed),
        "reason": [""] * len(clips) + [f[1] for f in failed],
    })
    table.to_csv(folder / f"{name}.csv", index=False)


@pytest.fixture(scope="module")
def extract_dir(tmp_path_factory) -> Path:
    if not FACES.is_dir():
        pytest.skip(f"real media folder {FACES} absent")
    folder = tmp_path_factory.mktemp("extracted")
    grey = np.full((360, 640, 3), 128, np.uint8)
    both = _photo("obama_and_biden.jpg")
    _write_extract_shard(folder, "shard-00000", [
        ("obamaAAAAAA_00000000_00003000", "obamaAAAAAA", [_photo("obama.jpg")] * 2, 0.5, 0.3),
        ("greyGGGGGGG_00000000_00003000", "greyGGGGGGG", [grey, grey], 0.5, 0.5),
        ("bidenBBBBBB_00000000_00003000", "bidenBBBBBB", [grey, _photo("biden.jpg")], 0.5, 0.15),
        ("duoDDDDDDDD_00001000_00004000", "duoDDDDDDDD", [both, both], 0.43, 0.30),   # points at Biden
    ], failed=[("brokenXXXXX_00000000_00003000", "undecodable")])
    _write_extract_shard(folder, "shard-00001", [
        ("obamaAAAAAA_00005000_00008000", "obamaAAAAAA", [_photo("obama2.jpg")] * 2, 0.5, 0.3),
        ("bidenCCCCCC_00000000_00003000", "bidenCCCCCC", [_photo("biden2.jpg")] * 2, 0.5, 0.3),
        ("junkJJJJJJJ_00000000_00003000", "junkJJJJJJJ", [b"not a jpeg"], 0.5, 0.5),   # corrupt frame
    ])
    return folder


@pytest.fixture(scope="module")
def first_run(extract_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faces")
    index = run_faces(extract_dir, out, _config())
    return out, index


def test_stage_outputs(extract_dir, first_run) -> None:
    out, index = first_run
    assert list(index.columns) == face_files.INDEX_COLUMNS
    assert list(index["clip_id"]) == [
        "obamaAAAAAA_00000000_00003000", "greyGGGGGGG_00000000_00003000", "bidenBBBBBB_00000000_00003000",
        "duoDDDDDDDD_00001000_00004000", "obamaAAAAAA_00005000_00008000", "bidenCCCCCC_00000000_00003000",
        "junkJJJJJJJ_00000000_00003000"]
    assert list(index["status"]) == ["ok", "skipped", "ok", "ok", "ok", "ok", "failed"]
    assert list(index["reason"]) == ["", "no_face", "", "", "", "", "undecodable_frame"]
    assert list(index["row"]) == [0, -1, 1, 2, 0, 1, -1]
    assert list(index["shard"]) == ["shard-00000"] * 4 + ["shard-00001"] * 3
    grey = index.iloc[1]
    assert (grey["frames_examined"], grey["frames_with_face"], grey["faces_in_frame"]) == (2, 0, 0)
    duo = index.iloc[3]
    assert duo["faces_in_frame"] >= 2 and duo["frames_with_face"] == 1
    biden = index.iloc[2]   # face only in frame 1 of 2: frame 0 (the middle-most) examined first
    assert (biden["frames_examined"], biden["frames_with_face"]) == (2, 1)

    assert set(index["split"]) <= {"train", "val", "test"}
    assert index.groupby("identity")["split"].nunique().max() == 1
    on_disk = read_table(out / "index.csv")
    pd.testing.assert_frame_equal(on_disk, index.astype(on_disk.dtypes.to_dict()), check_dtype=False)

    features = np.load(out / "features-00000.npy", allow_pickle=False)
    crops = np.load(out / "crops-00000.npy", allow_pickle=False)
    landmarks = np.load(out / "landmarks-00000.npy", allow_pickle=False)
    assert features.shape == (3, 128) and features.dtype == np.float32
    assert crops.shape == (3, 224, 224, 3) and crops.dtype == np.uint8
    assert landmarks.shape == (3, 68, 2) and landmarks.dtype == np.float32
    assert np.load(out / "features-00001.npy").shape == (2, 128)

    # Parity with the library run directly on the same (JPEG round-tripped) frames.
    source = extracted.load_shard(extract_dir / "shard-00000.npz")
    clip = FaceAnalyzer("hog", 1).analyse_clip(source.frames(3), 0.43, 0.30, make_backend("dlib128"))
    np.testing.assert_allclose(features[2], clip.feature, atol=1e-6)
    np.testing.assert_array_equal(crops[2], clip.representative.crop)
    np.testing.assert_array_equal(landmarks[2], clip.representative.landmarks)

    # Identity structure survives the stage: Biden in the two-person frame is nearest Biden.
    other = np.load(out / "features-00001.npy")
    distance = lambda a, b: float(np.linalg.norm(a - b))   # noqa: E731
    assert distance(features[2], other[1]) < distance(features[2], other[0])   # biden2 vs obama2
    assert distance(features[0], other[0]) < distance(features[0], other[1])   # obama vs obama2

    meta = json.loads((out / "meta.json").read_text())
    assert (meta["backend"], meta["dim"], meta["crop_size"]) == ("dlib128", 128, 224)
    assert meta["split_by"] == "video" and "test_csv_sha256" not in meta
    assert "seconds_per_clip" not in meta  # machine-dependent: printed, never in the DVC output


def test_stage_resumes(extract_dir, first_run, capsys) -> None:
    out, index = first_run
    arrays = sorted(out.glob("*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in arrays + sorted(out.glob("shard-*.csv"))}
    again = run_faces(extract_dir, out, _config())
    pd.testing.assert_frame_equal(again, index)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps        # nothing rewritten
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("faces: 0 done, 7 reused from an earlier run, 1 skipped (extract_failed: 1)")

    # an interrupted run: shard 1's table never got written -> only shard 1 is redone
    (out / "shard-00001.csv").unlink()
    (out / "features-00001.npy").write_bytes(b"half written")
    third = run_faces(extract_dir, out, _config(workers=1))
    pd.testing.assert_frame_equal(third, index)
    assert (out / "crops-00000.npy").stat().st_mtime_ns == stamps[out / "crops-00000.npy"]
    assert np.load(out / "features-00001.npy").shape == (2, 128)
    assert "4 reused" in capsys.readouterr().out



def test_an_unreadable_extract_shard_is_reported_and_retried_later(extract_dir, first_run, tmp_path, capsys) -> None:
    """A truncated extract shard is one recorded reason for its clips, not a crash of the stage."""
    extract_copy = tmp_path / "extracted"
    shutil.copytree(extract_dir, extract_copy)
    whole = (extract_copy / "shard-00001.npz").read_bytes()
    (extract_copy / "shard-00001.npz").write_bytes(whole[:1000])
    out = tmp_path / "faces"
    index = run_faces(extract_copy, out, _config())
    shard1 = index[index["clip_id"].str.startswith(("obamaAAAAAA_00005000", "bidenCCCCCC", "junkJJJJJJJ"))]
    assert list(shard1["reason"]) == ["unreadable_extract_shard"] * 3
    assert (out / "shard-00000.csv").exists() and not (out / "shard-00001.csv").exists()   # not marked done
    assert "unreadable_extract_shard: 3" in capsys.readouterr().out

    (extract_copy / "shard-00001.npz").write_bytes(whole)   # repaired: only shard 1 is done now
    pd.testing.assert_frame_equal(run_faces(extract_copy, out, _config()), first_run[1])
    assert "4 reused" in capsys.readouterr().out.strip().splitlines()[-1]

TEST_CSV = ("bidenBBBBBB,0,3,0.5,0.15\n"
            "bidenCCCCCC,0,3,0.5,0.3\n"
            "greyGGGGGGG,0,3,0.5,0.5\n"      # in the index, no usable face
            "notInIndex1,1,2,0.5,0.5\n"      # not downloaded: ignored
            "../../etc/passwd,0,1,0.5,0.5\n"  # unusable rows name no test id
            "bad,row\n")


def test_stage_takes_the_test_split_from_a_csv(extract_dir, first_run, tmp_path, capsys) -> None:
    out = tmp_path / "faces"
    shutil.copytree(first_run[0], out)
    test_csv = tmp_path / "avspeech_test.csv"
    test_csv.write_text(TEST_CSV)
    capsys.readouterr()
    index = run_faces(extract_dir, out, _config(split_by="csv", test_csv=str(test_csv)))
    printed = capsys.readouterr().out
    assert "0 done, 7 reused" in printed   # the split comes after the face work: nothing analysed again
    assert f"test split from {test_csv}: 4 ids, 2 unusable rows" in printed
    assert "identities with a usable face: train 2, val 0, test 2" in printed

    # only the split differs from the video run, and it is by identity
    pd.testing.assert_frame_equal(index.drop(columns="split"), first_run[1].drop(columns="split"))
    splits = dict(zip(index["identity"], index["split"]))
    assert index.groupby("identity")["split"].nunique().max() == 1
    assert {i for i, s in splits.items() if s == "test"} == {"bidenBBBBBB", "bidenCCCCCC", "greyGGGGGGG"}
    assert {splits[i] for i in ("obamaAAAAAA", "duoDDDDDDDD", "junkJJJJJJJ")} <= {"train", "val"}
    on_disk = read_table(out / "index.csv")
    assert list(on_disk["split"]) == list(index["split"])

    meta = json.loads((out / "meta.json").read_text())
    assert meta["split_by"] == "csv" and meta["test_csv_ids"] == 4
    assert meta["test_csv_sha256"] == hashlib.sha256(test_csv.read_bytes()).hexdigest()

    # another test CSV is another output; back to video, the video run's files again
    test_csv.write_text("bidenBBBBBB,0,3,0.5,0.15\n")
    index = run_faces(extract_dir, out, _config(split_by="csv", test_csv=str(test_csv)))
    assert dict(zip(index["identity"], index["split"]))["bidenCCCCCC"] in ("train", "val")
    assert json.loads((out / "meta.json").read_text())["test_csv_sha256"] == hashlib.sha256(
        b"bidenBBBBBB,0,3,0.5,0.15\n").hexdigest()
    run_faces(extract_dir, out, _config(test_csv=str(tmp_path / "absent.csv")))   # not read by split_by video
    for name in ("index.csv", "meta.json"):
        assert (out / name).read_bytes() == (first_run[0] / name).read_bytes(), name


def test_stage_refuses_a_test_csv_that_leaves_test_or_train_empty(extract_dir, first_run, tmp_path) -> None:
    test_csv = tmp_path / "avspeech_test.csv"
    # none of the downloaded videos in the test CSV: refused before any face work
    test_csv.write_text("notInIndex1,1,2,0.5,0.5\n")
    with pytest.raises(DataError, match="none of the 6 videos the extract stage could use is in faces.test_csv"):
        run_faces(extract_dir, tmp_path / "never", _config(split_by="csv", test_csv=str(test_csv)))
    # every video in it (the test CSV downloaded alone): nothing to train on
    test_csv.write_text("".join(f"{i},0,3,0.5,0.5\n" for i in ("obamaAAAAAA", "greyGGGGGGG", "bidenBBBBBB",
                                                                 "duoDDDDDDDD", "bidenCCCCCC", "junkJJJJJJJ")))
    with pytest.raises(DataError, match="all 6 videos .* nothing is left to train on"):
        run_faces(extract_dir, tmp_path / "never", _config(split_by="csv", test_csv=str(test_csv)))
    assert not (tmp_path / "never").exists()
    # the test videos are there but none has a usable face: found after the face work, and
    # no index.csv is written
    out = tmp_path / "faces"
    shutil.copytree(first_run[0], out)
    (out / "index.csv").unlink()
    test_csv.write_text("greyGGGGGGG,0,3,0.5,0.5\njunkJJJJJJJ,0,3,0.5,0.5\n")
    with pytest.raises(DataError, match="none of the 4 identities with a usable face is in faces.test_csv"):
        run_faces(extract_dir, out, _config(split_by="csv", test_csv=str(test_csv)))
    assert not (out / "index.csv").exists()


@needs_media
def test_stage_with_vggface_backend(tmp_path) -> None:
    """The paper's backend through the stage (random weights: checks the plumbing)."""
    import torch

    from speech2face.data.face_backends import build_vggface

    torch.manual_seed(0)
    model = build_vggface().eval()
    weights = tmp_path / "vggface.pt"
    torch.save(model.state_dict(), weights)
    extract = tmp_path / "extracted"
    _write_extract_shard(extract, "shard-00000", [
        ("obamaAAAAAA_00000000_00003000", "obamaAAAAAA", [_photo("obama.jpg")], 0.5, 0.3),
        ("greyGGGGGGG_00000000_00003000", "greyGGGGGGG", [np.full((64, 64, 3), 128, np.uint8)], 0.5, 0.5),
    ])
    out = tmp_path / "faces"
    index = run_faces(extract, out, _config(backend="vggface4096", vggface_weights=str(weights), workers=1))
    assert list(index["status"]) == ["ok", "skipped"]
    features = np.load(out / "features-00000.npy")
    crops = np.load(out / "crops-00000.npy")
    assert features.shape == (1, 4096)
    with torch.inference_mode():
        expected = model.features(torch.from_numpy(crops).permute(0, 3, 1, 2).float())
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "meta.json").read_text())["dim"] == 4096


def test_stage_bad_params(tmp_path) -> None:
    (tmp_path / "extracted").mkdir()
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("aaaaaaaaaaa,0,3,0.5,0.5\n")
    cases = [
        ({"backend": "facenet"}, "faces.backend = 'facenet'"),
        ({"backend": "vggface4096"}, "faces.vggface_weights = None"),
        ({"backend": "vggface4096", "vggface_weights": str(tmp_path / "absent.pt")}, "an existing file"),
        ({"detector": "mtcnn"}, "faces.detector"),
        ({"split_fractions": [0.5, 0.6, 0.2]}, "sum to 1"),
        ({"workers": 0}, "faces.workers"),
        ({"upsample": 9}, "faces.upsample"),
        ({"split_by": "speaker"}, "faces.split_by = 'speaker': expected one of ['video', 'csv']"),
        ({"split_by": "csv", "test_csv": str(tmp_path / "absent.csv")}, "faces.test_csv"),
        ({"split_by": "csv", "test_csv": str(tmp_path)}, "faces.test_csv"),   # a folder
        ({"split_by": "csv", "test_csv": str(test_csv), "split_fractions": [0, 0, 1]},
         "faces.split_fractions = [0.0, 0.0, 1.0]: expected a train or val fraction > 0 when split_by is csv"),
    ]
    for change, message in cases:
        with pytest.raises(ParamsError, match=re.escape(message)):
            run_faces(tmp_path / "extracted", tmp_path / "out", _config(**change))
    with pytest.raises(FileNotFoundError, match="run the extract stage first"):
        run_faces(tmp_path / "absent", tmp_path / "out", _config())


def test_stage_script_reports_bad_params_in_one_line(tmp_path) -> None:
    params = (ROOT / "params.yaml").read_text().replace("backend: dlib128", "backend: vggface4096")
    (tmp_path / "params.yaml").write_text(params)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "faces.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("faces: params.yaml: faces.vggface_weights = None: expected the path")


def analyse_or_crash(frames, x: float, y: float):
    """analyse_task, except that a clip of flat grey frames kills its worker process with a real
    SIGSEGV, as a dlib bug on a strange frame would (nothing in Python can catch that)."""
    if not isinstance(frames, str) and all(int(np.ptp(frame)) == 0 for frame in frames):
        import ctypes

        ctypes.string_at(0)
    return analyse_task(frames, x, y)


class _CrashingPool(WorkerPool):
    """The stage's pool, whose workers run analyse_or_crash instead of analyse_task."""

    def map(self, fn, calls, on_crash):
        return super().map(analyse_or_crash, calls, on_crash)


@needs_media
def test_a_worker_crash_fails_only_its_clip(tmp_path) -> None:
    extract, out = tmp_path / "extracted", tmp_path / "faces"
    grey = np.full((120, 160, 3), 128, np.uint8)
    _write_extract_shard(extract, "shard-00000", [
        ("obamaAAAAAA_00000000_00003000", "obamaAAAAAA", [_photo("obama.jpg")], 0.5, 0.3),
        ("greyGGGGGGG_00000000_00003000", "greyGGGGGGG", [grey], 0.5, 0.5),
        ("bidenCCCCCC_00000000_00003000", "bidenCCCCCC", [_photo("biden2.jpg")], 0.5, 0.3),
    ])
    shard = downstream_shards(extract)[0]
    config = _config(workers=2)
    out.mkdir()
    with _CrashingPool(config.workers, init_worker, (config.analyzer_settings(),)) as pool:
        table, _ = faces_shard(shard, out, pool, engines.NO_PROGRESS, extract, config)
        # the pool survives for the next shard, and the crash was real (in a worker process)
        again = list(pool.map(analyse_task, [("undecodable_frame", 0.5, 0.5)], on_crash=crashed_clip))
    assert list(table["reason"]) == ["", "face_analysis_crashed", ""]
    assert list(table["status"]) == ["ok", "failed", "ok"] and list(table["row"]) == [0, -1, 1]
    assert np.load(out / "features-00000.npy").shape == (2, 128)
    assert read_table(out / "shard-00000.csv")["reason"].tolist() == ["", "face_analysis_crashed", ""]
    assert again[0].reason == "undecodable_frame"


KILLABLE_FACES = """
import sys
from pathlib import Path
from speech2face.core.params import build_config
from speech2face.data.faces import FacesConfig, run_faces
run_faces(Path(sys.argv[1]), Path(sys.argv[2]), build_config(FacesConfig, {"workers": 1}))
"""


@needs_media
def test_killed_mid_way_a_rerun_finishes_with_the_same_files(tmp_path) -> None:
    """kill -9 the faces stage after its first shard: the rerun keeps the finished shards,
    leaves no half-written file, and ends with the bytes of an uninterrupted run."""
    extract = tmp_path / "extracted"
    photos = ["obama.jpg", "biden.jpg", "obama2.jpg", "biden2.jpg"]
    for s in range(6):
        _write_extract_shard(extract, f"shard-{s:05d}", [
            (f"p{s}{k}AAAAAAAA_0000000{k}_00003000", f"p{s}{k}AAAAAAAA", [_photo(photos[(s + k) % 4])], 0.5, 0.3)
            for k in range(3)])
    reference, out = tmp_path / "reference", tmp_path / "faces"
    run_faces(extract, reference, _config(workers=1))

    job = subprocess.Popen([sys.executable, "-c", KILLABLE_FACES, str(extract), str(out)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None and not (out / "shard-00000.csv").exists():
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)   # the stage and its worker process, no clean-up
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    finished = sorted(p.name for p in out.glob("shard-*.csv"))
    assert 1 <= len(finished) < 6 and not (out / "index.csv").exists()
    kept = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name.endswith(("-00000.npy", "shard-00000.csv"))}
    assert len(kept) == 4

    run_faces(extract, out, _config(workers=1))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept                 # finished work not redone
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
