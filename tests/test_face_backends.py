"""Face backends: the VGG-Face architecture and its weight loader (no weights ship), the
dlib backend's interface, and backend construction errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.face_backends import (VGGFACE_MEAN_RGB, BackendError, Dlib128Backend, backend_class,
                                       build_vggface, load_vggface_weights, make_backend)

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
