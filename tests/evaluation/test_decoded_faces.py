"""Decoded-face evaluation (speech2face.evaluation.decoded_faces): re-embedding, detectability,
identity preservation and image-level retrieval.

The figures are checked two ways: on hand-made vectors whose cosines are known exactly
(identity_preservation, image_retrieval), and on real faces: aligned crops of the photos in
../shared/media/faces (detected, landmarked, aligned with speech2face.data.face_analysis.FaceAnalyzer and
embedded with dlib128 from the original photo, as the faces stage does), re-embedded the way
speech2face.evaluation.evaluate does (HOG, upsampling 1, no size limit, any face position). A flat grey
image stands for a decoded image with no recognisable face. The end-to-end test uses a real
FaceDecoder whose output is, by construction, exactly one real crop (mean texture = the crop,
mean landmarks = its landmarks, last layers zero), so every figure has a known answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speech2face.evaluation.decoded_faces import (detection_rate, evaluate_decoded_faces, identity_preservation,
                                         image_retrieval, reembed_images)

ROOT = Path(__file__).resolve().parents[2]
FACES = ROOT.parent / "shared" / "media" / "faces"
needs_media = pytest.mark.skipif(not FACES.is_dir(), reason=f"real media folder {FACES} absent")
SIZE = 224
PHOTOS = {"obama": "obama.jpg", "biden": "biden.jpg", "collins": "astronaut.png"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend():
    from speech2face.data.face_backends import make_backend

    return make_backend("dlib128")


@pytest.fixture(scope="module")
def analyzer():
    """The evaluation's analyzer (speech2face.evaluation.evaluate): any face anywhere in the 224 image."""
    from speech2face.data.face_analysis import FaceAnalyzer

    return FaceAnalyzer(detector="hog", upsample=1, crop_size=SIZE, detect_max_side=None, max_centre_offset=None)


@pytest.fixture(scope="module")
def real_faces(backend) -> dict[str, dict[str, np.ndarray]]:
    """{person: crop (224, 224, 3) uint8, landmarks (68, 2) crop pixels, feature (128,) of the photo}."""
    from speech2face.data.face_analysis import FaceAnalyzer

    if not FACES.is_dir():
        pytest.skip(f"real media folder {FACES} absent")
    photo_analyzer = FaceAnalyzer("hog", upsample=1)
    out = {}
    for person, name in PHOTOS.items():
        face = photo_analyzer.analyse_frame(np.asarray(Image.open(FACES / name).convert("RGB")), 0.5, 0.3).face
        assert face is not None, name
        out[person] = {"crop": np.array(face.crop), "landmarks": face.landmarks,
                       "feature": backend.embed([face])[0]}
    return out


def grey_image() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 128, np.uint8)


# ------------------------------------------------------------- hand-made vectors


def hand_made_vectors() -> tuple[np.ndarray, np.ndarray]:
    """Sources s0 = e0, s1 = (0.6, 0.8, 0, 0) (cos(s0, s1) = 0.6), s2 = e2, scaled by 2;
    re-embeddings r0 = e0, r1 = (0, 0.6, 0.8, 0), r2 = (0, 0, 1, 1) / sqrt 2, scaled by 3
    (lengths must not matter). cos(r_i, s_j):
        r0: 1, 0.6, 0        r1: 0, 0.48, 0.8        r2: 0, 0, 1/sqrt 2."""
    sources = 2.0 * np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0]])
    reembedded = 3.0 * np.array([[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 1, 1] / np.sqrt(2)])
    return reembedded, sources


def test_identity_preservation_with_three_identities() -> None:
    reembedded, sources = hand_made_vectors()
    figures = identity_preservation(reembedded, sources, np.array(["a", "b", "c"]))
    own = [1.0, 0.48, 1 / np.sqrt(2)]
    assert figures["identity_cosine"] == pytest.approx(np.mean(own), abs=1e-12)
    assert figures["identity_cosine_std"] == pytest.approx(np.std(own), abs=1e-12)
    # mean cosine to the other identities' sources, per decoded face, then averaged
    assert figures["other_identity_cosine"] == pytest.approx(np.mean([(0.6 + 0) / 2, (0 + 0.8) / 2, 0]), abs=1e-12)
    # the real sources among themselves: pairs (0,1), (1,0) at 0.6, four pairs at 0
    assert figures["real_other_identity_cosine"] == pytest.approx(1.2 / 6, abs=1e-12)
    # r0 (1 > 0.6) and r2 (0.71 > 0) are nearest their own source; r1 (0.48 < 0.8) is not
    assert figures["own_is_nearest"] == pytest.approx(2 / 3, abs=1e-12)


def test_identity_preservation_ignores_other_clips_of_the_same_identity() -> None:
    """With identities (a, b, b), s2 is r1's own person: only s0 counts as 'other' for r1 and
    r2, so r1 is now nearest its own source (0.48 > 0)."""
    reembedded, sources = hand_made_vectors()
    figures = identity_preservation(reembedded, sources, np.array(["a", "b", "b"]))
    assert figures["other_identity_cosine"] == pytest.approx(np.mean([(0.6 + 0) / 2, 0, 0]), abs=1e-12)
    assert figures["real_other_identity_cosine"] == pytest.approx((0.6 + 0 + 0.6 + 0) / 4, abs=1e-12)
    assert figures["own_is_nearest"] == 1.0


def test_image_retrieval_recall_at_k() -> None:
    gallery = np.eye(4)
    hits = image_retrieval(gallery.copy(), gallery, np.arange(4))
    assert {k: v.tolist() for k, v in hits.items()} == {1: [1.0] * 4, 2: [1.0] * 4}
    # query 0 nearest its item; query 1 nearest item 2, then its own (rank 1);
    # query 2 nearest items 0, 3, then its own (rank 2)
    queries = np.array([[1.0, 0.1, 0, 0], [0, 0.6, 0.8, 0], [0.7, 0, 0.2, 0.5]])
    hits = image_retrieval(queries, gallery, np.array([0, 1, 2]), ks=(1, 2, 3, 5))
    assert {k: v.tolist() for k, v in hits.items()} == {1: [1, 0, 0], 2: [1, 1, 0], 3: [1, 1, 1]}  # K = 5 > 4 items: left out


# ------------------------------------------------------------------- real faces


@needs_media
def test_reembedding_a_real_crop_finds_the_face_and_its_identity(real_faces, analyzer, backend) -> None:
    """The aligned crop is found again and re-embedded within 0.1 (Euclidean) of the photo's
    own feature, far nearer than another person (dlib's same-person threshold is 0.6). The
    fallback landmarks (here deliberately wrong) are not used when a face is found."""
    obama, biden = real_faces["obama"], real_faces["biden"]
    wrong = np.tile(np.array([[60.0, 60.0], [160.0, 170.0]], np.float32), (34, 1))
    features, detected = reembed_images(obama["crop"][None], analyzer, backend, wrong[None])
    assert features.shape == (1, 128) and features.dtype == np.float32
    assert detected.tolist() == [True]
    distance = np.linalg.norm(features[0] - obama["feature"])
    assert distance < 0.1
    assert np.linalg.norm(features[0] - biden["feature"]) > 0.6
    with_true_fallback, _ = reembed_images(obama["crop"][None], analyzer, backend, obama["landmarks"][None])
    np.testing.assert_array_equal(features, with_true_fallback)


@needs_media
def test_reembedding_a_faceless_image_uses_the_fallback_landmarks(real_faces, analyzer, backend, dlib_descriptor) -> None:
    """A flat grey image: no face detected, the given landmarks stand in; the feature is
    finite and is exactly dlib's descriptor of the grey image from those landmarks."""
    fallback = real_faces["collins"]["landmarks"]
    images = np.stack([grey_image(), real_faces["obama"]["crop"]])
    features, detected = reembed_images(images, analyzer, backend, np.stack([fallback, fallback]))
    assert detected.tolist() == [False, True]
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[0], dlib_descriptor(grey_image(), fallback), atol=1e-6)
    assert np.linalg.norm(features[0] - features[1]) > 0.3      # not the face's feature


@needs_media
def test_detection_rate_counts_images_with_a_face(real_faces, analyzer) -> None:
    assert detection_rate(np.stack([real_faces["obama"]["crop"], grey_image()]), analyzer) == 0.5
    assert detection_rate(np.stack([face["crop"] for face in real_faces.values()]), analyzer) == 1.0
    assert np.isnan(detection_rate(np.zeros((0, SIZE, SIZE, 3), np.uint8), analyzer))


@needs_media
def test_evaluate_decoded_faces_on_a_decoder_that_always_draws_obama(real_faces, analyzer, backend) -> None:
    """A real FaceDecoder whose every output is Obama's crop (mean texture = the crop, mean
    landmarks = its landmarks, last layers zero: the warp is the identity). Test set: Obama,
    Biden, Collins, with their true features as both the 'true' and the 'voice' features.
    Known answers: every decoded face is detected and re-embeds as Obama, so only Obama's row
    keeps its identity (own_is_nearest 1/3); retrieval ranks the three the same way for every
    query (Obama, then Biden, then Collins, the photos' feature distances 0.84 < 0.88), so
    R@1 = 1/3, R@2 = 2/3."""
    from speech2face.models.face_decoder import FaceDecoder

    people = list(PHOTOS)
    features = np.stack([real_faces[p]["feature"] for p in people])
    crops = np.stack([real_faces[p]["crop"] for p in people])
    obama = real_faces["obama"]
    torch.manual_seed(0)
    decoder = FaceDecoder(width=0.03125, mean_landmarks=torch.from_numpy(obama["landmarks"]) / (SIZE - 1),
                          mean_texture=torch.from_numpy(obama["crop"]).permute(2, 0, 1).float() / 255,
                          feature_mean=torch.from_numpy(features.mean(axis=0)),
                          feature_std=torch.from_numpy(features.std(axis=0)))
    with torch.no_grad():
        for last in (decoder.landmark_mlp[-1], decoder.texture_convs[-1]):
            last.weight.zero_()
    figures, images, per_query = evaluate_decoded_faces(decoder, features, np.array(people), features, features,
                                                        np.arange(3), crops, analyzer, backend)
    for key in ("from_true", "from_voice"):
        assert images[key].shape == (3, SIZE, SIZE, 3) and images[key].dtype == np.uint8
        assert np.abs(images[key].astype(int) - obama["crop"][None].astype(int)).max() <= 1
    assert figures["decoded_detected"] == 1.0 and figures["voice_decoded_detected"] == 1.0
    assert figures["real_detected"] == 1.0
    own = figures["identity_cosine"]
    assert 0.8 < own < 0.95          # Obama ~1, the other two at the cross-person cosine ~0.8
    assert figures["own_is_nearest"] == pytest.approx(1 / 3)
    assert figures["image_R@K"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert figures["decoder_only_R@K"] == figures["image_R@K"]
    assert per_query["image_hits"][1].tolist() == [1.0, 0.0, 0.0]   # only Obama's voice finds Obama
    assert per_query["identity_cosine"].mean() == pytest.approx(own)
    # the reference figure comes from the real features alone
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosines = normed @ normed.T
    assert figures["real_other_identity_cosine"] == pytest.approx(cosines[~np.eye(3, dtype=bool)].mean(), abs=1e-6)
