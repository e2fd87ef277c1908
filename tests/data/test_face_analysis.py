"""Face detection, choice, landmarks, alignment and the dlib embedding, on real photos."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speech2face.data.face_backends import make_backend
from speech2face.data.face_analysis import (CANONICAL_POINTS, FaceAnalyzer, alignment_points, apply_transform,
                               combine_features, fit_similarity, frames_by_closeness_to_middle,
                               warp_to_crop)

ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT.parent / "shared" / "media" / "faces"
needs_media = pytest.mark.skipif(not FACES.is_dir(), reason=f"real media folder {FACES} absent")


def photo(name: str, max_side: int | None = None) -> np.ndarray:
    image = Image.open(FACES / name).convert("RGB")
    if max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(image)


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog", upsample=1)


@pytest.fixture(scope="module")
def dlib128():
    return make_backend("dlib128")


@pytest.fixture(scope="module")
def face_recognition():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import face_recognition
    return face_recognition


@pytest.fixture(scope="module")
def features(analyzer, dlib128) -> dict[str, np.ndarray]:
    """dlib128 features of the four single-person portraits (full size: exercises downscaling)."""
    out = {}
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "biden2.jpg"):
        clip = analyzer.analyse_clip([photo(name)], 0.5, 0.3, dlib128)
        assert clip.ok, f"{name}: {clip.reason}"
        out[name] = clip.feature
    return out


# ----------------------------------------------------------------- pure geometry

def test_fit_similarity_recovers_a_known_transform() -> None:
    angle, scale, shift = 0.3, 1.7, np.array([12.5, -4.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = np.random.default_rng(0).uniform(0, 100, (5, 2))
    matrix = fit_similarity(source, source @ rotation.T + shift)
    np.testing.assert_allclose(matrix[:, :2], rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


def test_warp_puts_a_frame_point_where_the_transform_says() -> None:
    """A bright blob at frame point p must peak at crop point M p (catches half-pixel, axis
    order and inverse-direction mistakes in the resampling)."""
    frame = np.zeros((200, 300, 3), np.uint8)
    yy, xx = np.mgrid[:200, :300]
    point = np.array([171.0, 64.0])
    blob = np.exp(-((xx - point[0]) ** 2 + (yy - point[1]) ** 2) / (2 * 3.0 ** 2))
    frame[...] = (255 * blob)[..., None].astype(np.uint8)
    angle, scale = -0.4, 1.3
    matrix = np.array([[scale * np.cos(angle), -scale * np.sin(angle), -90.0],
                       [scale * np.sin(angle), scale * np.cos(angle), 60.0]])
    crop = warp_to_crop(frame, matrix, 224).astype(np.float64)[..., 0]
    weights = crop * (crop > 0.2 * crop.max())
    cy, cx = np.mgrid[:224, :224]
    centroid = np.array([(weights * cx).sum(), (weights * cy).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, apply_transform(matrix, point[None])[0], atol=0.15)


def test_frames_are_tried_from_the_middle_outwards() -> None:
    assert frames_by_closeness_to_middle(3) == [1, 0, 2]
    assert frames_by_closeness_to_middle(4) == [1, 2, 0, 3]
    assert frames_by_closeness_to_middle(1) == [0]


def test_combine_features_mean_and_renormalisation() -> None:
    a = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)
    np.testing.assert_allclose(combine_features(a, normalised=False), [1.5, 2.0])
    np.testing.assert_allclose(combine_features(a, normalised=True), [0.6, 0.8], rtol=1e-6)


# -------------------------------------------------------------- real photos

@needs_media
def test_same_person_closer_than_different_person(features) -> None:
    def dist(a: str, b: str) -> float:
        return float(np.linalg.norm(features[a] - features[b]))

    same = {"obama": dist("obama.jpg", "obama2.jpg"), "biden": dist("biden.jpg", "biden2.jpg")}
    cross = [dist(o, b) for o, b in itertools.product(("obama.jpg", "obama2.jpg"), ("biden.jpg", "biden2.jpg"))]
    assert len(cross) == 4
    assert max(same.values()) < min(cross), (same, cross)
    # dlib's own operating point: same person below 0.6
    assert max(same.values()) < 0.6 < min(cross), (same, cross)


@needs_media
def test_detection_landmarks_and_embedding_match_face_recognition(analyzer, dlib128, face_recognition) -> None:
    """Independent computation: face_recognition's public API on the same frame."""
    frame = photo("obama2.jpg", 640)
    boxes = analyzer.detect(frame, (frame.shape[1] * 0.5, frame.shape[0] * 0.3))
    ref = face_recognition.face_locations(frame, number_of_times_to_upsample=0, model="hog")
    assert [(int(t), int(r), int(b), int(l)) for l, t, r, b in boxes] == ref  # found at level 0

    clip = analyzer.analyse_clip([frame], 0.5, 0.3, dlib128)
    face = clip.representative
    top, right, bottom, left = ref[0]
    ref_landmarks = face_recognition.face_landmarks(frame, [ref[0]], model="large")[0]
    np.testing.assert_array_equal(face.frame_landmarks[0:17], ref_landmarks["chin"])
    np.testing.assert_array_equal(face.frame_landmarks[36:42], ref_landmarks["left_eye"])
    np.testing.assert_array_equal(face.frame_landmarks[42:48], ref_landmarks["right_eye"])
    ref_encoding = face_recognition.face_encodings(frame, [ref[0]], model="large")[0]
    np.testing.assert_allclose(clip.feature, ref_encoding, atol=1e-6)


@needs_media
@pytest.mark.parametrize("who, x, y", [("biden", 0.43, 0.30), ("obama", 0.61, 0.29)])
def test_pointing_at_one_of_two_faces_chooses_it(analyzer, dlib128, features, who, x, y) -> None:
    # obama_and_biden.jpg: Biden on the left (face centre ~ (0.43, 0.30)), Obama on the right.
    clip = analyzer.analyse_clip([photo("obama_and_biden.jpg")], x, y, dlib128)
    assert clip.ok and clip.faces_in_frame >= 2
    other = "obama" if who == "biden" else "biden"
    to_same = np.linalg.norm(clip.feature - features[f"{who}.jpg"])
    to_other = np.linalg.norm(clip.feature - features[f"{other}.jpg"])
    assert to_same < to_other, (to_same, to_other)
    cx = (clip.representative.box[0] + clip.representative.box[2]) / 2 / 2000
    assert abs(cx - x) < 0.05


@needs_media
def test_partial_face_is_handled(analyzer, dlib128) -> None:
    clip = analyzer.analyse_clip([photo("obama_partial_face.jpg")], 0.25, 0.2, dlib128)
    if clip.ok:
        assert clip.representative.crop.shape == (224, 224, 3) and clip.feature.shape == (128,)
    else:
        assert clip.reason == "no_face"


def test_no_face_in_grey_or_noise(analyzer, dlib128) -> None:
    grey = np.full((360, 640, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    clip = analyzer.analyse_clip([grey, noise, grey], 0.5, 0.5, dlib128, embed_frames="all")
    assert not clip.ok and clip.reason == "no_face"
    assert clip.frames_examined == 3 and clip.faces_in_frame == 0 and clip.feature is None


@needs_media
def test_face_far_from_the_given_centre_is_not_taken(dlib128) -> None:
    frame = photo("obama.jpg", 640)
    strict = FaceAnalyzer("hog", upsample=0, max_centre_offset=1.0).analyse_clip([frame], 0.05, 0.95, dlib128)
    assert not strict.ok and strict.reason == "face_far_from_centre" and strict.faces_in_frame == 1
    loose = FaceAnalyzer("hog", upsample=0, max_centre_offset=None).analyse_clip([frame], 0.05, 0.95, dlib128)
    assert loose.ok


@needs_media
def test_aligned_crop_is_upright_and_centred(analyzer, face_recognition) -> None:
    for name in ("obama.jpg", "biden2.jpg"):
        # Rotate the photo 20 degrees: alignment must undo it.
        frame = np.asarray(Image.fromarray(photo(name, 640)).rotate(20, resample=Image.Resampling.BILINEAR))
        clip = analyzer.analyse_clip([frame], 0.5, 0.35)
        assert clip.ok, name
        crop, landmarks = clip.representative.crop, clip.representative.landmarks
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
        assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
        eyes = alignment_points(landmarks)[:2]
        # A least-squares fit over five points: the eyes land within ~3% of the crop.
        np.testing.assert_allclose(eyes, CANONICAL_POINTS[:2] * 224, atol=7)
        assert abs(eyes[0, 1] - eyes[1, 1]) < 3   # upright: eyes level
        # Independent check of the image warp: dlib finds the same landmarks in the crop.
        found = face_recognition.face_locations(crop, 1, "hog")
        assert len(found) == 1
        ref = face_recognition.face_landmarks(crop, found, model="large")[0]
        ref_eyes = np.array([np.mean(ref["left_eye"], axis=0), np.mean(ref["right_eye"], axis=0)])
        np.testing.assert_allclose(ref_eyes, eyes, atol=3)


@needs_media
def test_multi_frame_modes(analyzer, dlib128) -> None:
    grey = np.full((480, 640, 3), 128, np.uint8)
    obama, obama2 = photo("obama.jpg", 640), photo("obama2.jpg", 640)
    single = {n: analyzer.analyse_clip([f], 0.5, 0.3, dlib128).feature for n, f in (("o", obama), ("o2", obama2))}

    # all: every frame with a face is embedded, the feature is their mean; the crop comes
    # from the frame nearest the middle (index 1 of 3).
    clip = analyzer.analyse_clip([obama2, obama, grey], 0.5, 0.3, dlib128, embed_frames="all")
    assert clip.frames_examined == 3 and len(clip.faces) == 2
    assert clip.representative.frame_index == 1
    np.testing.assert_allclose(clip.feature, (single["o"] + single["o2"]) / 2, atol=1e-6)

    # middle: the middle frame has no face; the tie between frames 0 and 2 goes to 0.
    clip = analyzer.analyse_clip([obama2, grey, obama], 0.5, 0.3, dlib128, embed_frames="middle")
    assert clip.frames_examined == 2 and len(clip.faces) == 1
    assert clip.representative.frame_index == 0
    np.testing.assert_allclose(clip.feature, single["o2"], atol=1e-6)
    assert set(clip.seconds) == {"detect", "landmarks", "align", "embed"}


@needs_media
def test_upsampling_only_when_needed(face_recognition) -> None:
    # Face about 45 px wide: HOG needs ~80 px at upsampling 0, so only level 1 finds it.
    small = photo("obama.jpg", 180)
    assert face_recognition.face_locations(small, 0, "hog") == []
    point = (small.shape[1] * 0.45, small.shape[0] * 0.25)
    assert FaceAnalyzer("hog", upsample=0).detect(small, point) == []
    found = FaceAnalyzer("hog", upsample=1).detect(small, point)
    assert len(found) == 1
    assert [(int(t), int(r), int(b), int(l)) for l, t, r, b in found] == face_recognition.face_locations(small, 1, "hog")
    # A big face is found at level 0 and the detector stops there (level-0 box, not level 1's).
    big = photo("obama.jpg", 640)
    boxes = FaceAnalyzer("hog", upsample=1).detect(big, (big.shape[1] * 0.5, big.shape[0] * 0.25))
    assert [(int(t), int(r), int(b), int(l)) for l, t, r, b in boxes] == face_recognition.face_locations(big, 0, "hog")
    assert boxes != [(l, t, r, b) for t, r, b, l in face_recognition.face_locations(big, 1, "hog")]


@needs_media
def test_cnn_detector(face_recognition) -> None:
    frame = photo("obama.jpg", 300)   # small (face ~80 px): the CNN detector takes ~0.6 s here on a CPU
    cnn = FaceAnalyzer("cnn", upsample=0)
    boxes = cnn.detect(frame, (frame.shape[1] * 0.5, frame.shape[0] * 0.25))
    ref = face_recognition.face_locations(frame, 0, "cnn")
    assert len(boxes) == 1 and [(int(t), int(r), int(b), int(l)) for l, t, r, b in boxes] == ref
    clip = cnn.analyse_clip([frame], 0.5, 0.25)
    assert clip.ok and clip.representative.crop.shape == (224, 224, 3)


def test_bad_analyzer_settings() -> None:
    with pytest.raises(ValueError, match="unknown face detector"):
        FaceAnalyzer("mtcnn")
    with pytest.raises(ValueError, match="upsample"):
        FaceAnalyzer("hog", upsample=-1)
