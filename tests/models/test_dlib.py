"""DlibFaceNet and extract_face_chips against dlib itself, on real faces.

References are dlib's own computations (dlib-bin): face_recognition_model_v1.
compute_face_descriptor on aligned chips and on whole images, get_face_chip(_details), and
extract_image_chip on float64 images (which skips dlib's uint8 truncation).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch

dlib = pytest.importorskip("dlib")
from PIL import Image  # noqa: E402

from speech2face.models.dlib.chips import CHIP_SIZE, extract_face_chips, face_chip_details, face_chip_grid  # noqa: E402
from speech2face.models.dlib.file_format import DlibModelError, read_dlib_net  # noqa: E402
from speech2face.models.dlib.network import load_dlib_face_net  # noqa: E402
from speech2face.models.dlib.weights import load_dlib_model, model_paths  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted(str(path) for path in (REPO.parent / "shared" / "media" / "faces").glob("*.*"))
CROPS = REPO / "data" / "faces" / "crops-00000.npy"
CROP_LANDMARKS = REPO / "data" / "faces" / "landmarks-00000.npy"
N_CROPS = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shape(landmarks: np.ndarray):
    """A dlib full_object_detection (it stores landmarks as integers)."""
    points = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks]
    return dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points)


def _as_tensor_image(image: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(dtype)


@pytest.fixture(scope="module")
def net():
    return load_dlib_face_net()


@pytest.fixture(scope="module")
def dlib_recognizer():
    return load_dlib_model("resnet128")


@pytest.fixture(scope="module")
def photo_faces():
    """(image, integer landmarks (68, 2)) for every face dlib finds in the test photos:
    9 faces; 3 of them large enough that dlib downsamples with its pyramid first."""
    if not PHOTOS:
        pytest.skip("no test photos in /work/shared/media/faces")
    detector, predictor = load_dlib_model("hog"), load_dlib_model("landmarks68")
    faces = []
    for path in PHOTOS:
        image = np.array(Image.open(path).convert("RGB"))
        for box in detector(image, 0):
            shape = predictor(image, box)
            faces.append((image, np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)))
    return faces


@pytest.fixture(scope="module")
def crop_faces():
    """The pipeline's aligned 224 px crops with their (float) landmarks, rounded as dlib would."""
    if not (CROPS.exists() and CROP_LANDMARKS.exists()):
        pytest.skip("pipeline face crops not built")
    crops = np.load(CROPS)[:N_CROPS]
    landmarks = np.round(np.load(CROP_LANDMARKS)[:N_CROPS].astype(np.float64))
    return list(zip(crops, landmarks))


def test_parsed_file_has_dlib_face_resnet_layers():
    parsed = read_dlib_net()
    counts = collections.Counter(layer.kind for layer in parsed.layers)
    assert counts == {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5,
                      "max_pool": 1, "fc": 1}
    assert parsed.structure.count("tag|skip") == 22          # 14 tags of ares + 4 x (tag, skip) extra
    assert parsed.input_size == (150, 150)
    np.testing.assert_allclose(parsed.input_mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)
    assert parsed.loss_margin == pytest.approx(0.04) and parsed.loss_distance_threshold == pytest.approx(0.6)
    convs = [layer for layer in parsed.layers if layer.kind == "con"]
    assert convs[0].arrays["weight"].shape == (32, 3, 7, 7)
    assert convs[0].config == dict(kernel=(7, 7), stride=(2, 2), padding=(0, 0))
    assert convs[-1].arrays["weight"].shape == (256, 256, 3, 3)
    assert parsed.layers[-1].arrays["weight"].shape == (128, 256)
    n_weights = sum(a.size for layer in parsed.layers for a in layer.arrays.values())
    # The file is those float32 weights plus about 5 kB of headers.
    assert 0 < os.path.getsize(model_paths()["resnet128"]) - 4 * n_weights < 10_000


def test_embedding_equals_dlib_on_dlib_chips(net, dlib_recognizer, photo_faces, crop_faces):
    chips = [dlib.get_face_chip(image, _shape(landmarks), CHIP_SIZE, 0.25)
             for image, landmarks in photo_faces + crop_faces]
    chips = np.stack(chips)
    reference = np.array([dlib_recognizer.compute_face_descriptor(np.ascontiguousarray(chip), 0)
                          for chip in chips])
    with torch.no_grad():
        ours = net(torch.from_numpy(chips).permute(0, 3, 1, 2).float()).numpy()
    # Achieved: 4e-7 (float32 rounding); descriptors are ~0.1 in magnitude.
    assert np.abs(ours - reference).max() < 1e-5
    # And the faces differ from one another (the comparison is not trivially satisfied).
    assert np.linalg.norm(reference[0] - reference[-1]) > 0.3


def test_chip_details_equal_dlib(photo_faces):
    landmarks = torch.from_numpy(np.stack([lm for _, lm in photo_faces]))
    details = face_chip_details(landmarks, CHIP_SIZE, 0.25)
    for i, (_, lm) in enumerate(photo_faces):
        reference = dlib.get_face_chip_details(_shape(lm), CHIP_SIZE, 0.25)
        rect = reference.rect
        centre = ((rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2)
        np.testing.assert_allclose(details.centre[i].numpy(), centre, atol=1e-9)
        assert float(details.width[i]) == pytest.approx(rect.width(), abs=1e-9)
        assert float(details.angle[i]) == pytest.approx(reference.angle, abs=1e-12)


def test_extracted_chips_equal_dlib_chips(photo_faces, crop_faces):
    faces = photo_faces + crop_faces
    # Unrounded: equal to dlib's own extraction of a float64 image (no uint8 truncation),
    # including the faces dlib first downsamples with its image pyramid.
    for image, landmarks in faces:
        chip = extract_face_chips(_as_tensor_image(image, torch.float64),
                                  torch.from_numpy(landmarks)[None])[0].numpy()
        details = dlib.get_face_chip_details(_shape(landmarks), CHIP_SIZE, 0.25)
        reference = np.stack([dlib.extract_image_chip(np.ascontiguousarray(image[..., c], dtype=np.float64),
                                                      details) for c in range(3)])
        assert np.abs(chip - reference).max() < 1e-6
    # quantize=True truncates like dlib's uint8 path: equal to get_face_chip but for values
    # that sit on an integer boundary (float rounding), a few pixels in 10^4.
    differences = []
    for image, landmarks in faces:
        chip = extract_face_chips(_as_tensor_image(image), torch.from_numpy(landmarks)[None].float(),
                                  quantize=True)[0].permute(1, 2, 0).numpy()
        reference = dlib.get_face_chip(image, _shape(landmarks), CHIP_SIZE, 0.25).astype(np.float32)
        differences.append(np.abs(chip - reference))
    assert max(d.max() for d in differences) <= 1.0
    assert np.mean([d.mean() for d in differences]) < 0.005


def test_face_chip_grid_samples_the_same_chip(crop_faces):
    # Faces under ~300 px (all of the 224 px crops) need no pyramid: plain grid_sample.
    crops = torch.from_numpy(np.stack([c for c, _ in crop_faces])).permute(0, 3, 1, 2).double()
    landmarks = torch.from_numpy(np.stack([lm for _, lm in crop_faces]))
    grid = face_chip_grid(landmarks, crops.shape[-2:])
    assert grid.shape == (len(crop_faces), CHIP_SIZE, CHIP_SIZE, 2)
    sampled = torch.nn.functional.grid_sample(crops, grid, align_corners=True)
    chips = extract_face_chips(crops, landmarks)
    inside = chips.sum(1, keepdim=True) > 0        # dlib leaves border-straddling pixels black
    assert torch.allclose(sampled * inside, chips, atol=1e-9)


def test_embedding_of_extracted_chips_matches_dlib_descriptor(net, dlib_recognizer, photo_faces):
    images_landmarks = photo_faces
    reference = np.array([dlib_recognizer.compute_face_descriptor(image, _shape(landmarks), 0, 0.25)
                          for image, landmarks in images_landmarks])
    for quantize, tolerance in ((False, 0.02), (True, 2e-3)):
        with torch.no_grad():
            ours = np.stack([
                net(extract_face_chips(_as_tensor_image(image), torch.from_numpy(landmarks)[None].float(),
                                       quantize=quantize))[0].numpy()
                for image, landmarks in images_landmarks])
        # Achieved: <= 0.009 smooth, <= 8.5e-4 quantized (same-person distances are < 0.6).
        assert np.linalg.norm(ours - reference, axis=1).max() < tolerance, quantize


def test_gradients_reach_the_input_image(net, crop_faces):
    crop, landmarks = crop_faces[0]
    image = _as_tensor_image(crop).requires_grad_(True)
    landmark_tensor = torch.from_numpy(landmarks)[None].float().requires_grad_(True)
    embedding = net(extract_face_chips(image, landmark_tensor))
    target = torch.zeros_like(embedding)
    (embedding - target).pow(2).sum().backward()
    grad = image.grad[0]
    assert torch.isfinite(grad).all() and torch.isfinite(landmark_tensor.grad).all()
    assert grad.abs().sum() > 0 and landmark_tensor.grad.abs().sum() > 0
    # Only pixels the chip samples get gradient: the image corners lie outside the chip.
    assert grad[:, :5, :5].abs().sum() == 0 and grad[:, 100:120, 100:120].abs().sum() > 0


def test_gradient_equals_finite_difference():
    """The backward pass is the derivative of the forward pass (float64, central differences;
    steps of 1e-3 and more cross ReLU/max-pool kinks and are off by 0.1 %)."""
    double_net = load_dlib_face_net().double()
    generator = torch.Generator().manual_seed(0)
    chip = torch.rand(1, 3, CHIP_SIZE, CHIP_SIZE, generator=generator, dtype=torch.float64) * 255
    direction = torch.randn(chip.shape, generator=generator, dtype=torch.float64)
    weights = torch.randn(1, 128, generator=generator, dtype=torch.float64)
    chip.requires_grad_(True)
    (double_net(chip) * weights).sum().backward()
    analytic = (chip.grad * direction).sum().item()
    step = 1e-5
    with torch.no_grad():
        plus = (double_net(chip + step * direction) * weights).sum().item()
        minus = (double_net(chip - step * direction) * weights).sum().item()
    assert analytic == pytest.approx((plus - minus) / (2 * step), rel=1e-6)


def test_missing_or_corrupt_file_gives_one_line_error(tmp_path):
    with pytest.raises(DlibModelError, match="not readable") as missing:
        load_dlib_face_net(tmp_path / "absent.dat")
    assert isinstance(missing.value, ValueError) and "\n" not in str(missing.value)

    original = Path(model_paths()["resnet128"]).read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(original[: len(original) // 2])
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    other_dlib_model = model_paths()["cnn_detector"]      # a dlib network of another kind
    for path in (truncated, garbage, other_dlib_model):
        with pytest.raises(DlibModelError, match="not a dlib face recognition network") as error:
            load_dlib_face_net(path)
        assert "\n" not in str(error.value)
