"""Face backends: the VGG-Face architecture and its weight loader (no weights ship), the
dlib backend (torch forward pass of dlib's network on dlib's chips) against dlib's own
compute_face_descriptor on real faces, and backend construction errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.data.face_backends import (VGGFACE_MEAN_RGB, BackendError, Dlib128Backend, backend_class,
                                       build_vggface, load_vggface_weights, make_backend)

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO.parent / "shared" / "media" / "faces").glob("*.*"))
SAMPLE_VIDEOS = sorted((REPO / "data" / "sample" / "videos").glob("*.mp4"))   # in the repository
N_CLIP_FACES = 12
# Default dlib128 (torch forward) vs dlib's compute_face_descriptor: measured at most 4.8e-7
# in any component over 278 real faces (float32 rounding; components are about 0.1). The
# smallest chip error worth catching, every chip pixel one grey level too bright, moves
# every face by 3e-4 or more; a wrong padding or a BGR chip by 3e-2. 1e-5 sits 20x above
# the rounding (other CPUs sum in another order) and 30x below that.
DESCRIPTOR_TOLERANCE = 1e-5

# VGG-16 with a 2622-way classifier: 13 convs (14,714,688) + fc6 25088x4096 + fc7 4096x4096
# + fc8 4096x2622, weights and biases.
VGGFACE_PARAMETERS = 145_002_878


def test_vggface_parameter_count_and_layout() -> None:
    with torch.device("meta"):          # no memory, no init: just the architecture
        model = build_vggface()
    assert sum(p.numel() for p in model.parameters()) == VGGFACE_PARAMETERS
    conv_count = 14_714_688
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("conv")) == conv_count
    names = [n for n, _ in model.named_parameters()]
    # the layout of the common vgg_face_dag.pth conversion, so such a file loads as is
    assert names[:2] == ["conv1_1.weight", "conv1_1.bias"] and names[-2:] == ["fc8.weight", "fc8.bias"]
    assert len(names) == 2 * 16
    assert tuple(model.fc6.weight.shape) == (4096, 512 * 7 * 7)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_vggface().eval()
    path = tmp_path_factory.mktemp("vggface") / "random_vggface.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_saved_weights_load_into_a_fresh_model_with_identical_outputs(weights_file) -> None:
    path, original = weights_file
    crop = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)

    backend = make_backend("vggface4096", path, device="cpu")   # builds a fresh model and loads
    assert backend.model is not original
    assert backend.name == "vggface4096" and backend.dim == 4096 and not backend.in_worker
    features = backend.embed_crops(crop)
    with torch.inference_mode():
        expected = original.features(torch.from_numpy(crop).permute(0, 3, 1, 2).float())
        expected_logits = original.fc8(expected)
    assert features.shape == (1, 4096) and features.dtype == np.float32
    np.testing.assert_array_equal(features, expected.numpy())
    assert (features >= 0).all() and (features > 0).any()     # fc7 after its ReLU
    logits = backend.logits(features)
    assert logits.shape == (1, 2622)
    np.testing.assert_array_equal(logits, expected_logits.numpy())


def test_vggface_input_is_rgb_minus_the_vggface_mean() -> None:
    """What reaches conv1_1 is the RGB image minus VGG-Face's mean colour, channels first."""
    with torch.device("meta"):
        model = build_vggface()
    seen = {}

    class Stop(Exception):
        pass

    def capture(module, inputs):
        seen["x"] = inputs[0]
        raise Stop   # the rest of the network is not needed

    model.conv1_1.register_forward_pre_hook(capture)
    image = torch.rand(1, 3, 224, 224) * 255
    with pytest.raises(Stop):
        model.features(image)
    expected = torch.stack([image[0, c] - VGGFACE_MEAN_RGB[c] for c in range(3)])[None]
    torch.testing.assert_close(seen["x"], expected, rtol=0, atol=1e-5)


def test_incompatible_weights_give_one_clear_line(tmp_path) -> None:
    with torch.device("meta"):
        model = build_vggface()
    # an ImageNet head (1000 classes) instead of 2622 identities, and nothing else
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc8.weight": torch.zeros(1000, 4096), "fc8.bias": torch.zeros(1000)}, wrong)
    with pytest.raises(BackendError) as error:
        load_vggface_weights(model, wrong)
    message = str(error.value)
    assert "\n" not in message
    assert "missing keys conv1_1.bias, conv1_1.weight, conv1_2.bias and 27 more" in message
    assert "wrong shapes fc8.weight (1000, 4096) (expected (2622, 4096)), fc8.bias (1000,)" in message

    extra = tmp_path / "extra.pt"
    torch.save({"classifier.weight": torch.zeros(2)}, extra)
    with pytest.raises(BackendError, match="unexpected keys classifier.weight"):
        load_vggface_weights(model, extra)
    with pytest.raises(BackendError, match="not found"):
        load_vggface_weights(model, tmp_path / "absent.pt")
    pickled_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled_module)       # a pickled module, not a state dict
    with pytest.raises(BackendError, match="cannot read"):
        load_vggface_weights(model, pickled_module)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BackendError, match="cannot read"):
        load_vggface_weights(model, garbage)


def test_make_backend_errors() -> None:
    with pytest.raises(BackendError, match="unknown face backend 'facenet'"):
        make_backend("facenet")
    with pytest.raises(BackendError, match="vggface_weights"):
        make_backend("vggface4096", None)
    with pytest.raises(BackendError, match="unknown face backend"):
        backend_class("facenet")


def test_dlib128_interface() -> None:
    backend = make_backend("dlib128")
    assert isinstance(backend, Dlib128Backend)
    assert (backend.name, backend.dim, backend.in_worker, backend.has_logits) == ("dlib128", 128, True, False)
    assert backend_class("dlib128") is Dlib128Backend and backend_class("vggface4096").dim == 4096
    with pytest.raises(NotImplementedError):
        backend.logits(np.zeros((1, 128), np.float32))
    with pytest.raises(NotImplementedError):
        backend.embed_crops(np.zeros((1, 224, 224, 3), np.uint8))


# ------------------------------------------------------------------ dlib128 on real faces

@pytest.fixture(scope="module")
def real_faces():
    """AlignedFaces (with their frames) of real images, found by the pipeline's analyzer:
    every face of the test photos (large ones included, which dlib pyramids down before
    cutting the chip) and a face of the middle frame of the first sample videos (320x240
    video frames, small faces)."""
    from PIL import Image

    from speech2face.data.face_analysis import FaceAnalyzer
    from speech2face.data.media import decode_clip

    analyzer = FaceAnalyzer("hog", upsample=1)
    faces = []
    for path in PHOTOS:
        frame = np.asarray(Image.open(path).convert("RGB"))
        height, width = frame.shape[:2]
        for left, top, right, bottom in analyzer.detect(frame):
            x, y = ((left + right) / 2 + 0.5) / width, ((top + bottom) / 2 + 0.5) / height
            outcome = analyzer.analyse_frame(frame, x, y)
            if outcome.face is not None:
                faces.append(outcome.face)
    clip_faces = 0
    for video in SAMPLE_VIDEOS:
        frames = decode_clip(video, 3)[1]      # as the extract stage decodes them
        frame = frames[len(frames) // 2]
        height, width = frame.shape[:2]
        boxes = analyzer.detect(frame)
        if boxes:
            left, top, right, bottom = boxes[0]
            outcome = analyzer.analyse_frame(frame, ((left + right) / 2 + 0.5) / width,
                                             ((top + bottom) / 2 + 0.5) / height)
            if outcome.face is not None:
                faces.append(outcome.face)
                clip_faces += 1
        if clip_faces == N_CLIP_FACES:
            break
    if len(faces) < 10:
        pytest.skip(f"only {len(faces)} real faces (test photos or sample videos absent)")
    return faces


@pytest.fixture(scope="module")
def dlib_reference(real_faces) -> np.ndarray:
    """dlib's own descriptors: compute_face_descriptor(frame, shape) per face."""
    pytest.importorskip("dlib")
    from speech2face.models.dlib.weights import load_dlib_model

    recognizer = load_dlib_model("resnet128")
    return np.array([recognizer.compute_face_descriptor(np.ascontiguousarray(face.frame), _dlib_shape(face))
                     for face in real_faces], dtype=np.float32)


def _dlib_shape(face):
    import dlib

    points = [dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in face.frame_landmarks]
    return dlib.full_object_detection(dlib.rectangle(*(int(round(v)) for v in face.box)), points)


def test_dlib128_equals_dlibs_own_descriptor_on_real_faces(real_faces, dlib_reference) -> None:
    backend = make_backend("dlib128")
    assert backend.network == "torch"
    features = backend.embed(real_faces)            # all faces in one batched forward
    assert features.shape == (len(real_faces), 128) and features.dtype == np.float32
    assert np.abs(features - dlib_reference).max() < DESCRIPTOR_TOLERANCE
    # The faces are varied: large ones from the photos (dlib pyramids them down first), small
    # ones from the video frames, all far apart from one another.
    widths = [face.box[2] - face.box[0] for face in real_faces]
    assert (max(widths) > 300 or not PHOTOS) and min(widths) < 100
    distances = np.linalg.norm(dlib_reference[:, None] - dlib_reference[None], axis=-1)
    assert distances[np.triu_indices(len(real_faces), 1)].min() > 100 * DESCRIPTOR_TOLERANCE

    one_at_a_time = np.concatenate([backend.embed([face]) for face in real_faces])
    np.testing.assert_allclose(one_at_a_time, features, rtol=0, atol=1e-6)   # batching changes nothing


def test_the_tolerance_catches_a_wrong_chip(real_faces, dlib_reference) -> None:
    """Each plausible chip mistake moves every face's descriptor well beyond the tolerance,
    so the parity test above would fail on any of them."""
    import dlib

    net = make_backend("dlib128")._net

    def descriptors(chips: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()).numpy()

    def chips(padding: float = 0.25) -> list[np.ndarray]:
        return [dlib.get_face_chip(np.ascontiguousarray(face.frame), _dlib_shape(face), size=150, padding=padding)
                for face in real_faces]

    right = chips()
    mistakes = {
        "padding 0.2": chips(0.2),
        "BGR": [chip[..., ::-1].copy() for chip in right],
        "one grey level brighter": [np.minimum(chip.astype(np.int16) + 1, 255).astype(np.uint8) for chip in right],
    }
    assert np.abs(descriptors(right) - dlib_reference).max() < DESCRIPTOR_TOLERANCE
    for name, wrong in mistakes.items():
        per_face = np.abs(descriptors(wrong) - dlib_reference).max(axis=1)
        assert per_face.min() > 10 * DESCRIPTOR_TOLERANCE, name


def test_dlib_network_option_is_dlibs_own_computation(real_faces, dlib_reference) -> None:
    backend = Dlib128Backend(network="dlib")
    np.testing.assert_array_equal(backend.embed(real_faces[:3]), dlib_reference[:3])


def test_torch_forward_runs_on_one_thread_and_restores_the_setting(real_faces) -> None:
    backend = make_backend("dlib128")
    seen = []
    hook = backend._net.register_forward_pre_hook(lambda module, inputs: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        backend.embed(real_faces[:2])
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert seen == [1]


def test_dlib128_edge_cases_and_errors(real_faces) -> None:
    backend = make_backend("dlib128")
    assert backend.embed([]).shape == (0, 128)
    assert make_backend("dlib128")._net is backend._net          # loaded once per process
    frameless = dataclasses.replace(real_faces[0], frame=None)
    with pytest.raises(ValueError, match="source frame"):
        backend.embed([frameless])
    with pytest.raises(BackendError, match="num_jitters=2 needs network='dlib'"):
        make_backend("dlib128", num_jitters=2)
    assert Dlib128Backend(num_jitters=2, network="dlib").num_jitters == 2
    with pytest.raises(BackendError, match="unknown network 'onnx'"):
        Dlib128Backend(network="onnx")
