"""Decoder training data (speech2face.data.face_data) and training (speech2face.training.decoder).

Inputs are real: seven faces found, landmarked, aligned (speech2face.data.face_analysis.FaceAnalyzer) and
embedded (dlib128) in the photos of ../shared/media/faces (two of Obama, two of Biden, one of
Eileen Collins, and the two faces of obama_and_biden.jpg), written by the test as a
faces-stage folder (index.csv + crops/landmarks/features shards) the way speech2face.data.faces
writes one, with a skipped row, a failed row and array rows out of index order, so that
``load_faces`` has to follow the index's ``shard`` and ``row`` columns.

References are independent computations: numpy for the loss terms and the mean landmarks,
dlib's own C++ face descriptor for the identity term, bilinear sampling with scipy for the
texture targets, and snapshots taken during training for the resume and best-epoch rules.
Training runs at width 0.03125 with batches of 2 on 6 faces (3 steps an epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.ndimage import map_coordinates

from speech2face.core.pictures import face_grid
from speech2face.models.face_decoder import decode
from speech2face.training.decoder import DecoderConfig, DecoderLoss, IdentityNet, train_decoder
from speech2face.data.face_data import Faces, crops_to_tensor, load_faces, mean_landmarks, target_textures
from speech2face.training.loop import TrainingError, best_epoch

ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT.parent / "shared" / "media" / "faces"
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not FACES.is_dir(), reason=f"real media folder {FACES} absent")]

SIZE = 224
SCALE = SIZE - 1
# portrait -> identity; obama_and_biden.jpg adds Biden (left face) and Obama (right face)
PORTRAITS = {"obama.jpg": "obama", "obama2.jpg": "obama", "biden.jpg": "biden", "biden2.jpg": "biden",
             "astronaut.png": "collins"}
TWO_FACES_PHOTO, TWO_FACES_LEFT_TO_RIGHT = "obama_and_biden.jpg", ("biden", "obama")
INDEX_COLUMNS = ["clip_id", "identity", "row", "status", "reason", "frames_examined", "frames_with_face",
                 "faces_in_frame", "shard", "split"]
TINY = dict(width=0.03125, batch_size=2, lr=1e-3, seed=0)


@dataclass
class PhotoFace:
    clip_id: str
    identity: str
    crop: np.ndarray          # (224, 224, 3) uint8 aligned
    landmarks: np.ndarray     # (68, 2) float32 crop pixels
    feature: np.ndarray       # (128,) float32 dlib128 of the original photo


@pytest.fixture(scope="module")
def photo_faces() -> list[PhotoFace]:
    """The seven faces, in a fixed order (portraits, then the two-face photo left to right)."""
    from speech2face.data.face_backends import make_backend
    from speech2face.data.face_analysis import FaceAnalyzer

    analyzer, backend = FaceAnalyzer("hog", upsample=1), make_backend("dlib128")

    def analyse(frame: np.ndarray, x: float, y: float, clip_id: str, identity: str) -> PhotoFace:
        face = analyzer.analyse_frame(frame, x, y).face
        assert face is not None, clip_id
        # np.array: a writable copy (PIL gives read-only arrays, which torch.from_numpy warns about)
        return PhotoFace(clip_id, identity, np.array(face.crop), face.landmarks, backend.embed([face])[0])

    faces = [analyse(np.asarray(Image.open(FACES / name).convert("RGB")), 0.5, 0.3, name.split(".")[0], who)
             for name, who in PORTRAITS.items()]
    frame = np.asarray(Image.open(FACES / TWO_FACES_PHOTO).convert("RGB"))
    height, width = frame.shape[:2]
    boxes = sorted(analyzer.detect(frame), key=lambda box: box[0])
    assert len(boxes) == 2
    for side, box, who in zip(("left", "right"), boxes, TWO_FACES_LEFT_TO_RIGHT):
        centre_x, centre_y = (box[0] + box[2]) / 2 + 0.5, (box[1] + box[3]) / 2 + 0.5
        faces.append(analyse(frame, centre_x / width, centre_y / height, f"together_{side}", who))
    # the labels are right: each face of the group photo is nearest a portrait of its person
    for face in faces[-2:]:
        nearest = min(faces[:5], key=lambda other: np.linalg.norm(other.feature - face.feature))
        assert nearest.identity == face.identity
    return faces


def split_of(identity: str) -> str:
    return "val" if identity == "collins" else "train"


def write_faces_folder(folder: Path, faces: list[PhotoFace]) -> list[PhotoFace]:
    """A faces-stage folder with two shards; returns the ok faces in index order.

    shard-00000 lists faces 0, (skipped), 1, 2 but stores them as rows [1, 0, 2];
    shard-00001 lists faces 3, 4, (failed), 5, 6 stored as rows [2, 0, 3, 1]."""
    layout = {"shard-00000": [(0, 1), (None, "no_face"), (1, 0), (2, 2)],
              "shard-00001": [(3, 2), (4, 0), (None, "face_analysis_error"), (5, 3), (6, 1)]}
    rows, in_order = [], []
    for shard, entries in layout.items():
        stored = sorted((row, faces[i]) for i, row in entries if i is not None)
        number = shard.removeprefix("shard-")
        np.save(folder / f"crops-{number}.npy", np.stack([face.crop for _, face in stored]))
        np.save(folder / f"landmarks-{number}.npy", np.stack([face.landmarks for _, face in stored]))
        np.save(folder / f"features-{number}.npy", np.stack([face.feature for _, face in stored]))
        for k, (i, row_or_reason) in enumerate(entries):
            if i is None:
                status = "skipped" if row_or_reason == "no_face" else "failed"
                rows.append([f"{shard}_missing_{k}", "nobody", -1, status, row_or_reason, 1, 0, 0, shard, "train"])
                continue
            face = faces[i]
            rows.append([face.clip_id, face.identity, row_or_reason, "ok", "", 1, 1, 1, shard,
                         split_of(face.identity)])
            in_order.append(face)
    pd.DataFrame(rows, columns=INDEX_COLUMNS).to_csv(folder / "index.csv", index=False)
    return in_order


@pytest.fixture(scope="module")
def faces_folder(photo_faces, tmp_path_factory) -> tuple[Path, list[PhotoFace]]:
    folder = tmp_path_factory.mktemp("faces")
    return folder, write_faces_folder(folder, photo_faces)


@pytest.fixture(scope="module")
def faces(faces_folder) -> Faces:
    return load_faces(faces_folder[0])


@pytest.fixture(scope="module")
def identity_net() -> IdentityNet:
    return IdentityNet("dlib")


def faces_of(photo_faces: list[PhotoFace]) -> Faces:
    table = pd.DataFrame({"clip_id": [f.clip_id for f in photo_faces], "identity": [f.identity for f in photo_faces],
                          "split": [split_of(f.identity) for f in photo_faces]})
    return Faces(table, np.stack([f.crop for f in photo_faces]), np.stack([f.landmarks for f in photo_faces]),
                 np.stack([f.feature for f in photo_faces]))


def sample(image_hwc: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear values (n, 3) of an (H, W, 3) image at (x, y) pixel positions (scipy)."""
    return np.stack([map_coordinates(image_hwc[..., c].astype(np.float64), [points[:, 1], points[:, 0]], order=1)
                     for c in range(image_hwc.shape[-1])], axis=-1)


def as_hwc(texture: torch.Tensor) -> np.ndarray:
    return texture.permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------ face_data


def test_load_faces_follows_the_index_rows_and_skips_unusable_clips(faces_folder, faces) -> None:
    _, expected = faces_folder
    assert len(faces) == 7 and faces.crop_size == SIZE
    assert list(faces.table["clip_id"]) == [f.clip_id for f in expected]
    assert list(faces.table["identity"]) == [f.identity for f in expected]
    assert list(faces.table["split"]) == [split_of(f.identity) for f in expected]
    assert list(faces.table.columns) == ["clip_id", "identity", "split"]
    np.testing.assert_array_equal(faces.crops, np.stack([f.crop for f in expected]))
    np.testing.assert_array_equal(faces.landmarks, np.stack([f.landmarks for f in expected]))
    np.testing.assert_array_equal(faces.features, np.stack([f.feature for f in expected]))
    assert faces.crops.dtype == np.uint8 and faces.landmarks.dtype == np.float32
    assert faces.features.dtype == np.float32
    val = faces.subset("val")
    assert list(val.table["clip_id"]) == ["astronaut"] and list(val.table.index) == [0]
    np.testing.assert_array_equal(val.crops[0], expected[4].crop)


def test_load_faces_without_usable_rows_says_so(tmp_path) -> None:
    pd.DataFrame([["a", "x", -1, "skipped", "no_face", 1, 0, 0, "shard-00000", "train"]],
                 columns=INDEX_COLUMNS).to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(ValueError, match="no usable faces"):
        load_faces(tmp_path)


def test_mean_landmarks_are_fractions_of_the_crop_side(faces) -> None:
    expected = faces.landmarks.astype(np.float64).mean(axis=0) / SCALE
    actual = mean_landmarks(faces)
    assert actual.shape == (68, 2) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-7)
    assert 0.15 < actual.min() and actual.max() < 0.95    # a face inside the crop


def test_target_texture_of_a_face_at_the_mean_geometry_is_its_crop(photo_faces) -> None:
    one = faces_of(photo_faces[:1])
    texture = target_textures(one, mean_landmarks(one))
    assert texture.shape == (1, 3, SIZE, SIZE) and texture.dtype == torch.float32
    difference = (texture - crops_to_tensor(one.crops)).abs()
    assert difference.max() < 1e-4 and difference.mean() < 1e-5


def test_target_textures_move_each_face_onto_the_mean_landmarks(photo_faces) -> None:
    """Face A (a real crop) and face B (the same crop moved by (+6, -4) px, landmarks too):
    the mean landmarks lie halfway, at A's landmarks + (3, -2). Both targets must show A's
    landmark pixels at the mean landmarks, so the two targets agree with each other where
    the two crops do not."""
    crop, landmarks = photo_faces[0].crop, photo_faces[0].landmarks
    offset = np.array([6, -4])
    moved = np.roll(crop, shift=(offset[1], offset[0]), axis=(0, 1))   # moved[y, x] = crop[y + 4, x - 6]
    pair = Faces(pd.DataFrame({"clip_id": ["a", "b"], "identity": ["o", "o"], "split": ["train", "train"]}),
                 np.stack([crop, moved]), np.stack([landmarks, landmarks + offset]).astype(np.float32),
                 np.zeros((2, 128), np.float32))
    mean = mean_landmarks(pair)
    np.testing.assert_allclose(mean * SCALE, landmarks + offset / 2, atol=1e-4)
    textures = target_textures(pair, mean)
    at_landmarks = sample(crop / 255.0, landmarks)
    for target in textures:
        shown = sample(as_hwc(target), mean * SCALE)
        assert np.abs(shown - at_landmarks).mean() < 0.01
    staying = np.abs(sample(crop / 255.0, mean * SCALE) - at_landmarks).mean()
    assert staying > 0.03                                   # without the warp: clearly other pixels
    # the face region (landmark bounding box) of the two targets: the same picture
    left, top = np.floor(mean.min(axis=0) * SCALE).astype(int)
    right, bottom = np.ceil(mean.max(axis=0) * SCALE).astype(int)
    region = (slice(None), slice(top, bottom + 1), slice(left, right + 1))
    targets_differ = (textures[0][region] - textures[1][region]).abs().mean()
    crops = crops_to_tensor(pair.crops)
    crops_differ = (crops[0][region] - crops[1][region]).abs().mean()
    assert targets_differ < 0.01 and crops_differ > 5 * targets_differ


# --------------------------------------------------------------------------- losses


def test_texture_and_landmark_terms_match_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    output = {"texture": torch.rand(2, 3, SIZE, SIZE, generator=generator),
              "landmarks": torch.rand(2, 68, 2, generator=generator),
              "image": torch.rand(2, 3, SIZE, SIZE, generator=generator)}
    target_texture = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    target_landmarks = torch.rand(2, 68, 2, generator=generator)
    loss = DecoderLoss(texture_weight=2.5, landmark_weight=40.0, identity_weight=1.0, identity_net=None)
    terms = loss.terms(output, target_texture, target_landmarks, torch.zeros(2, 128), SIZE)
    texture_l1 = np.abs(output["texture"].double().numpy() - target_texture.double().numpy()).mean()
    landmark_mse = ((output["landmarks"].double().numpy() - target_landmarks.double().numpy()) ** 2).mean()
    assert set(terms) == {"texture_l1", "landmark_mse", "total"}       # no identity net, no identity term
    assert float(terms["texture_l1"]) == pytest.approx(2.5 * texture_l1, rel=1e-6)
    assert float(terms["landmark_mse"]) == pytest.approx(40.0 * landmark_mse, rel=1e-6)
    assert float(terms["total"]) == pytest.approx(2.5 * texture_l1 + 40.0 * landmark_mse, rel=1e-6)


def test_identity_term_is_one_minus_cosine_of_the_dlib_embedding(photo_faces, identity_net, dlib_descriptor) -> None:
    """A perfectly decoded face (the real aligned crop, its true landmarks) against its own
    photo's dlib feature: an identity loss near 0 (measured 0.0005-0.0008 on these faces);
    against another photo of the same person ~0.04, another person ~0.15-0.19. The value is
    1 - cosine with dlib's own C++ descriptor of the crop (the torch replica within 2e-3)."""
    obama, biden = photo_faces[0], photo_faces[2]
    assert (obama.identity, biden.identity) == ("obama", "biden")
    image = crops_to_tensor(obama.crop[None])
    output = {"texture": image, "landmarks": torch.from_numpy(obama.landmarks)[None] / SCALE, "image": image}
    loss = DecoderLoss(texture_weight=1.0, landmark_weight=100.0, identity_weight=3.0, identity_net=identity_net)

    def identity(feature: np.ndarray) -> float:
        terms = loss.terms(output, image, output["landmarks"], torch.from_numpy(feature)[None], SIZE)
        assert float(terms["texture_l1"]) == 0 and float(terms["landmark_mse"]) == 0
        assert float(terms["total"]) == pytest.approx(float(terms["identity"]))
        return float(terms["identity"]) / 3.0

    own, same_person, other_person = identity(obama.feature), identity(photo_faces[1].feature), identity(biden.feature)
    assert own < 0.005
    assert 0.01 < same_person < 0.1
    assert other_person > 0.1 and other_person > 2 * same_person
    reference = dlib_descriptor(obama.crop, obama.landmarks)
    for value, feature in ((own, obama.feature), (other_person, biden.feature)):
        cosine = reference @ feature / (np.linalg.norm(reference) * np.linalg.norm(feature))
        assert value == pytest.approx(1 - cosine, abs=2e-3)


def test_identity_term_has_a_gradient_towards_the_image(photo_faces, identity_net) -> None:
    """The identity term trains the decoder through the image: its gradient reaches the pixels."""
    face = photo_faces[2]
    image = crops_to_tensor(face.crop[None]).requires_grad_(True)
    landmarks = torch.from_numpy(face.landmarks)[None] / SCALE
    output = {"texture": image.detach(), "landmarks": landmarks, "image": image}
    terms = DecoderLoss(identity_net=identity_net).terms(output, image.detach(), landmarks,
                                                         torch.from_numpy(photo_faces[0].feature)[None], SIZE)
    terms["identity"].backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


# ------------------------------------------------------------------------- training


def train(faces: Faces, folder: Path, epochs: int, loss_fn: DecoderLoss, on_epoch=None, **overrides):
    config = DecoderConfig(**{**TINY, "epochs": epochs, **overrides})
    return train_decoder(config, faces.subset("train"), faces.subset("val"), folder / "last.pt", loss_fn,
                         on_epoch=on_epoch)


def test_training_lowers_the_train_loss(faces, identity_net, tmp_path) -> None:
    model, history = train(faces, tmp_path, 3, DecoderLoss(identity_net=identity_net))
    assert [row["epoch"] for row in history] == [1, 2, 3] and [row["step"] for row in history] == [3, 6, 9]
    losses = [row["train_loss"] for row in history]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 0.97 * losses[0]
    for row in history:   # the total is the sum of the logged terms
        assert row["train_loss"] == pytest.approx(row["train_texture_l1"] + row["train_landmark_mse"]
                                                  + row["train_identity"], rel=1e-5)
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0
    assert not model.training and model.width == TINY["width"]


def test_resume_runs_only_the_missing_epochs(faces, tmp_path) -> None:
    """2 epochs, then the same checkpoint with epochs=3: only epoch 3 runs, after the first
    two rows as they were; and epoch 3 is what an uninterrupted 3-epoch run gives (the
    optimizer state and the data order were restored, not restarted)."""
    loss_fn = DecoderLoss(identity_net=None)
    _, first = train(faces, tmp_path / "resumed", 2, loss_fn)
    ran = []
    _, resumed = train(faces, tmp_path / "resumed", 3, loss_fn, on_epoch=lambda row, model: ran.append(row["epoch"]))
    assert ran == [3]
    assert len(resumed) == 3
    assert resumed[:2] == first
    _, straight = train(faces, tmp_path / "straight", 3, loss_fn)
    for key in resumed[2]:
        if key != "seconds":
            assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-6, abs=1e-9), key


class RisingValidationLoss(DecoderLoss):
    """The real loss, plus a penalty that grows with every validation pass (validation runs
    without gradients): the validation loss rises epoch after epoch whatever the data, so
    the best epoch is the first."""

    validations = 0

    def terms(self, *args, **kwargs):
        terms = super().terms(*args, **kwargs)
        if not torch.is_grad_enabled():
            RisingValidationLoss.validations += 1
            terms["total"] = terms["total"] + 10.0 * RisingValidationLoss.validations
        return terms


def test_the_best_validation_epoch_is_returned(faces, tmp_path) -> None:
    snapshots = {}

    def keep(row, model):
        snapshots[row["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    RisingValidationLoss.validations = 0
    model, history = train(faces, tmp_path, 3, RisingValidationLoss(identity_net=None), on_epoch=keep)
    assert [row["val_loss"] for row in history] == sorted(row["val_loss"] for row in history)
    assert best_epoch(history) == 1
    returned = model.state_dict()
    for key, value in snapshots[1].items():
        torch.testing.assert_close(returned[key], value, rtol=0, atol=0)
    assert any(not torch.equal(returned[k], snapshots[3][k]) for k in returned)   # training moved on


def test_diverging_training_raises_training_error(faces, tmp_path) -> None:
    """lr = 1e10 blows the landmarks apart after the first step (the warp's spline system
    becomes singular): a TrainingError that says what to do, not a linear-algebra crash."""
    with pytest.raises(TrainingError, match="lower decoder.lr"):
        train(faces, tmp_path, 2, DecoderLoss(identity_net=None), lr=1e10)


def test_nan_features_raise_training_error(faces, tmp_path) -> None:
    broken = faces.take(np.arange(len(faces)))
    broken.features = broken.features.copy()
    broken.features[1, 5] = np.nan
    with pytest.raises(TrainingError, match="NaN or infinite features") as caught:
        train(broken, tmp_path, 1, DecoderLoss(identity_net=None))
    assert broken.table["clip_id"][1] in str(caught.value)


def test_a_single_training_face_trains(faces, tmp_path) -> None:
    """One face has no feature spread (its std is undefined): training still runs, and the
    decoder reproduces that face's mean geometry and texture from its feature."""
    one = faces.take(np.array([0]))
    model, history = train_decoder(DecoderConfig(**{**TINY, "epochs": 1}), one, None, tmp_path / "last.pt",
                                   DecoderLoss(identity_net=None))
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]) and math.isnan(history[0]["val_loss"])
    torch.testing.assert_close(model.feature_std, torch.ones(128), rtol=0, atol=0)
    with torch.no_grad():
        output = model(torch.from_numpy(one.features))
    assert torch.isfinite(output["image"]).all()
    np.testing.assert_allclose(output["landmarks"][0].numpy() * SCALE, one.landmarks[0], atol=0.5)


def test_no_training_faces_is_a_training_error(faces, tmp_path) -> None:
    with pytest.raises(TrainingError, match="no training faces"):
        train_decoder(DecoderConfig(**{**TINY, "epochs": 1}), faces.take(np.array([], int)), None,
                      tmp_path / "last.pt", DecoderLoss(identity_net=None))


# ------------------------------------------------------------------ decode and grids


def test_decode_gives_uint8_faces_and_pixel_landmarks(faces, tmp_path) -> None:
    model, _ = train(faces, tmp_path, 1, DecoderLoss(identity_net=None))
    images, landmarks = decode(model, faces.features, batch_size=3)     # 7 faces: batches of 3, 3, 1
    assert images.shape == (7, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert landmarks.shape == (7, 68, 2) and landmarks.dtype == np.float32
    with torch.no_grad():
        output = model(torch.from_numpy(faces.features))
    expected_images = (output["image"].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected_images.astype(int)).max() <= 1
    np.testing.assert_allclose(landmarks, output["landmarks"].numpy() * SCALE, atol=1e-3)
    assert 0 < landmarks.min() and landmarks.max() < SCALE    # pixels, not fractions
    empty_images, empty_landmarks = decode(model, np.zeros((0, 128), np.float32))
    assert empty_images.shape == (0, SIZE, SIZE, 3) and empty_landmarks.shape == (0, 68, 2)


def test_face_grid_writes_the_rows_as_one_png(photo_faces, tmp_path) -> None:
    crops = [face.crop for face in photo_faces[:6]]
    path = tmp_path / "grids" / "faces.png"
    face_grid([crops[:3], crops[3:]], path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (3 * SIZE, 2 * SIZE)
        pixels = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(pixels[SIZE:, 2 * SIZE:], crops[5])     # row 2, column 3, lossless
    labelled = tmp_path / "labelled.png"
    face_grid([crops[:3], crops[3:]], labelled, labels=["true", "decoded", "voice"])
    written = np.asarray(Image.open(labelled).convert("RGB"))
    changed = np.argwhere((written != pixels).any(axis=-1))
    assert len(changed) > 0 and changed[:, 0].max() < 20                  # labels only in the top strip
    assert sorted({int(x) // SIZE for x in changed[:, 1]}) == [0, 1, 2]   # one label per column
