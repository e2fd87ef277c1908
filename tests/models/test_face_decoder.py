"""FaceDecoder (speech2face.models.face_decoder): architecture, initialisation, gradients, save/load.

Everything here is computed for real on small synthetic inputs (no dlib, no photos): the
references are the architecture written out by hand (channel formula, parameter count),
the decoder's own sub-modules recombined by hand (the forward pass), numpy (the
standardised shared layer) and ``sparse_image_warp`` (the final warp). The mean landmarks
are real: tests/fixtures/face_landmarks.npy row 0 holds the sample corpus's mean landmarks in
224 x 224 crop pixels. The mean texture is a smooth colour pattern, so that a warp that
moves it (or fails to) is visible in the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.models.face_decoder import (FLOW_GRID, DecoderError, FaceDecoder, decoder_channels, load_decoder,
                                 save_decoder, to_uint8)
from speech2face.models.warp import sparse_image_warp

SIZE = 224
SCALE = SIZE - 1          # pixel of a landmark fraction f is f * (SIZE - 1)
LANDMARKS_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "face_landmarks.npy"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mean_landmarks() -> torch.Tensor:
    """(68, 2) fractions of the side: the sample corpus's mean face."""
    return torch.from_numpy(np.load(LANDMARKS_FILE)[0]) / SCALE


@pytest.fixture(scope="module")
def mean_texture() -> torch.Tensor:
    """(3, 224, 224) smooth pattern in [0.1, 0.9], a different phase per channel."""
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(2 * np.pi * xs / 37 + c) * torch.cos(2 * np.pi * ys / 53)
                        for c in range(3)])


def standardisation(in_dim: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-trivial feature mean and std (dlib-like: small values, std ~0.05)."""
    generator = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(in_dim, generator=generator),
            0.03 + 0.05 * torch.rand(in_dim, generator=generator))


def make_decoder(width: float, mean_landmarks, mean_texture, seed: int = 0) -> FaceDecoder:
    torch.manual_seed(seed)
    feature_mean, feature_std = standardisation()
    return FaceDecoder(width=width, mean_landmarks=mean_landmarks, mean_texture=mean_texture,
                       feature_mean=feature_mean, feature_std=feature_std)


def features_like_training(model: FaceDecoder, batch: int, seed: int = 1) -> torch.Tensor:
    """Inputs distributed as the training features: mean + std * N(0, 1)."""
    noise = torch.randn(batch, model.in_dim, generator=torch.Generator().manual_seed(seed))
    return model.feature_mean + model.feature_std * noise


# ------------------------------------------------------------------- architecture


def test_decoder_channels_follow_cole_et_al() -> None:
    """C_i = max(256 / 2^i, 32) for the fc grid and the four upsamplings, times the width."""
    assert decoder_channels(1.0) == [256, 128, 64, 32, 32]
    assert decoder_channels(1.0) == [int(max(256 / 2 ** i, 32)) for i in range(5)]
    assert decoder_channels(0.5) == [128, 64, 32, 16, 16]
    assert decoder_channels(0.03125) == [8, 4, 2, 1, 1]
    assert decoder_channels(0.001) == [1, 1, 1, 1, 1]     # never zero channels


def test_parameter_count_at_width_one_matches_the_architecture() -> None:
    """Counted from the architecture formula, not from the module: fc 128->1000, landmark MLP
    1000->800->136, fc 1000 -> 14*14*256, four 5x5 transposed convolutions
    256->128->64->32->32, a 1x1 convolution 32->3 (every layer with a bias)."""
    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    channels = [256, 128, 64, 32, 32]
    expected = (linear(128, 1000)
                + linear(1000, 800) + linear(800, 68 * 2)
                + linear(1000, 14 * 14 * 256)
                + sum(c_in * c_out * 5 * 5 + c_out for c_in, c_out in zip(channels[:-1], channels[1:]))
                + linear(32, 3))
    assert expected == 52_366_067
    model = FaceDecoder(width=1.0)
    assert sum(p.numel() for p in model.parameters()) == expected
    # the means and the standardisation are buffers (saved, never trained)
    assert {name for name, _ in model.named_buffers()} == {"feature_mean", "feature_std", "feature_norm",
                                                          "mean_landmarks", "mean_texture"}


def test_feature_norm_makes_f_dec_read_only_the_direction(mean_landmarks, mean_texture) -> None:
    """With feature_norm set (as training sets it), inputs are rescaled to that length first:
    a voice prediction 300x too long decodes like the same direction at the training length."""
    torch.manual_seed(0)
    feature_mean, feature_std = standardisation()
    model = FaceDecoder(width=0.03125, mean_landmarks=mean_landmarks, mean_texture=mean_texture,
                        feature_mean=feature_mean, feature_std=feature_std, feature_norm=1.4).eval()
    features = features_like_training(model, batch=3)
    with torch.no_grad():
        h = model.f_dec(features)
        torch.testing.assert_close(model.f_dec(300.0 * features), h, rtol=1e-4, atol=1e-5)
    rescaled = (features / features.norm(dim=1, keepdim=True) * 1.4).double().numpy()
    weight = model.shared[0].weight.detach().double().numpy()
    bias = model.shared[0].bias.detach().double().numpy()
    standardised = (rescaled - feature_mean.double().numpy()) / feature_std.double().numpy()
    np.testing.assert_allclose(h.double().numpy(), np.maximum(standardised @ weight.T + bias, 0.0),
                               rtol=1e-5, atol=1e-5)
    # without it (feature_norm 0, the default) the length matters
    plain = make_decoder(0.03125, mean_landmarks, mean_texture).eval()
    with torch.no_grad():
        assert (plain.f_dec(300.0 * features) - plain.f_dec(features)).abs().max() > 1.0


def test_image_size_other_than_224_is_refused() -> None:
    with pytest.raises(ValueError, match="224"):
        FaceDecoder(width=0.03125, image_size=128)


def test_output_shapes_and_f_dec(mean_landmarks, mean_texture) -> None:
    model = make_decoder(0.0625, mean_landmarks, mean_texture).eval()
    features = features_like_training(model, batch=3)
    with torch.no_grad():
        output = model(features)
        h = model.f_dec(features)
    assert output["texture"].shape == (3, 3, SIZE, SIZE)
    assert output["image"].shape == (3, 3, SIZE, SIZE)
    assert output["landmarks"].shape == (3, 68, 2)

    # f_dec: ReLU(W (x - mean) / std + b), 1000 units, written out in float64 numpy
    weight = model.shared[0].weight.detach().double().numpy()
    bias = model.shared[0].bias.detach().double().numpy()
    standardised = ((features - model.feature_mean) / model.feature_std).double().numpy()
    expected = np.maximum(standardised @ weight.T + bias, 0.0)
    assert h.shape == (3, 1000)
    assert (h >= 0).all()
    assert 0.2 < (h > 0).float().mean() < 0.8            # a real ReLU: some units off, some on
    np.testing.assert_allclose(h.double().numpy(), expected, rtol=1e-5, atol=1e-5)

    # forward is built on h = f_dec(features): recombine the branches by hand
    with torch.no_grad():
        landmarks = model.mean_landmarks + model.landmark_mlp(h).view(3, 68, 2)
        grid = model.texture_fc(h).view(3, model.channels[0], 14, 14)
        texture = model.mean_texture + model.texture_convs(grid)
        image, _ = sparse_image_warp(texture, (model.mean_landmarks * SCALE).expand(3, -1, -1),
                                     landmarks * SCALE, flow_grid=FLOW_GRID)
    torch.testing.assert_close(output["landmarks"], landmarks, rtol=0, atol=1e-6)
    torch.testing.assert_close(output["texture"], texture, rtol=0, atol=1e-6)
    torch.testing.assert_close(output["image"], image, rtol=0, atol=1e-6)
    # the standardisation matters: the raw features would give other landmarks
    with torch.no_grad():
        raw = model.mean_landmarks + model.landmark_mlp(model.shared(features)).view(3, 68, 2)
    assert (raw - landmarks).abs().max() > 1e-4


def test_initial_output_is_the_mean_face_at_width_one(mean_landmarks, mean_texture) -> None:
    """At initialisation (paper width) the last layers are ~0: the texture is the mean texture,
    the landmarks the mean landmarks (within 0.5 px), so the image, the mean texture warped to
    those landmarks, is the mean texture itself."""
    model = make_decoder(1.0, mean_landmarks, mean_texture).eval()
    features = features_like_training(model, batch=2)
    with torch.no_grad():
        output = model(features)
    assert (output["texture"] - mean_texture).abs().max() < 1e-3
    landmark_error_px = ((output["landmarks"] - mean_landmarks) * SCALE).abs()
    assert landmark_error_px.max() < 0.5
    assert landmark_error_px.max() > 0                     # small, not frozen at zero
    image_error = (output["image"] - mean_texture).abs()
    assert image_error.mean() < 5e-3 and image_error.max() < 0.05


def test_warp_moves_the_mean_landmarks_onto_the_predicted_ones(mean_landmarks, mean_texture) -> None:
    """Direction of the final warp: with the last landmark layer set to a pure shift of
    (+5, -3) px, the image shows at each predicted landmark what the texture shows at the
    mean landmark (and not what it shows at the predicted position)."""
    model = make_decoder(0.03125, mean_landmarks, mean_texture).eval()
    shift = torch.tensor([5.0, -3.0])
    with torch.no_grad():
        model.landmark_mlp[-1].weight.zero_()
        model.landmark_mlp[-1].bias.copy_((shift / SCALE).repeat(68))
        model.texture_convs[-1].weight.zero_()             # texture = mean texture exactly
        output = model(features_like_training(model, batch=1))
    torch.testing.assert_close(output["landmarks"][0], mean_landmarks + shift / SCALE, rtol=0, atol=1e-6)
    torch.testing.assert_close(output["texture"][0], mean_texture, rtol=0, atol=0)

    def sample(image: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
        """Bilinear values (68, 3) at pixel positions (pixel centres at integers)."""
        grid = (points_px / SCALE * 2 - 1).view(1, 1, -1, 2)
        return torch.nn.functional.grid_sample(image[None], grid, align_corners=True)[0, :, 0].T

    at_destination = sample(output["image"][0], (mean_landmarks + shift / SCALE) * SCALE)
    from_source = sample(mean_texture, mean_landmarks * SCALE)
    unmoved = sample(mean_texture, (mean_landmarks + shift / SCALE) * SCALE)
    moved_error = (at_destination - from_source).abs().mean()
    assert moved_error < 0.01
    assert (unmoved - from_source).abs().mean() > 20 * moved_error   # the pattern does change over 5 px


def test_gradients_reach_every_branch_through_the_warp(mean_landmarks, mean_texture) -> None:
    """A loss on the warped image only: the landmark MLP gets its gradient through the warp's
    flow, the texture convolutions through the bilinear sampling, the shared layer from both."""
    model = make_decoder(0.125, mean_landmarks, mean_texture).train()
    features = features_like_training(model, batch=2)
    target = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    loss = (model(features)["image"] - target).abs().mean()
    loss.backward()
    groups = {"landmark MLP (first layer)": model.landmark_mlp[0].weight,
              "landmark MLP (last layer)": model.landmark_mlp[-1].weight,
              "texture fc": model.texture_fc.weight,
              "first transposed convolution": model.texture_convs[1].weight,
              "texture output convolution": model.texture_convs[-1].weight,
              "shared layer": model.shared[0].weight}
    for name, parameter in groups.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name
    assert all(buffer.grad is None for buffer in model.buffers())   # the means are not trained


def test_landmark_gradient_comes_from_the_warp_alone(mean_landmarks, mean_texture) -> None:
    """The image depends on the landmarks only through the warp: a finite difference of the
    image loss along the landmark bias agrees with autograd (the warp's flow gradient is
    right, not merely non-zero). The landmarks are first moved ~(0.3, -0.2) px: at zero flow
    every pixel samples exactly at a pixel centre, where bilinear sampling has a kink and a
    finite difference straddles two slopes. The step (2e-6 px) is tiny for the same reason."""
    model = make_decoder(0.03125, mean_landmarks, mean_texture).double().eval()
    features = features_like_training(model, batch=1).double()
    target = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    bias = model.landmark_mlp[-1].bias
    with torch.no_grad():
        bias.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64).repeat(68) / SCALE)

    def image_loss() -> torch.Tensor:
        return ((model(features)["image"] - target) ** 2).mean()

    image_loss().backward()
    direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    analytic = float((bias.grad * direction).sum())
    step = 1e-8
    with torch.no_grad():
        bias += step * direction
        plus = float(image_loss())
        bias -= 2 * step * direction
        minus = float(image_loss())
        bias += step * direction
    numeric = (plus - minus) / (2 * step)
    assert abs(analytic) > 1e-6
    assert numeric == pytest.approx(analytic, rel=1e-5)


def test_to_uint8_clamps_rounds_and_moves_channels_last() -> None:
    images = torch.tensor([-0.2, 0.0, 0.5, 1.0, 1.3, 0.999]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    converted = to_uint8(images)
    assert converted.dtype == np.uint8 and converted.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(converted[0, ..., 0], [[0, 0, 128], [255, 255, 255]])


# ----------------------------------------------------------------------- save / load


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, mean_landmarks, mean_texture) -> None:
    model = make_decoder(0.0625, mean_landmarks, mean_texture, seed=3)
    with torch.no_grad():   # move every weight away from its initial value
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    path = tmp_path / "models" / "face_decoder.pt"
    save_decoder(model, path)
    assert json.loads(path.with_suffix(".json").read_text()) == {"in_dim": 128, "width": 0.0625,
                                                                 "image_size": SIZE}
    loaded = load_decoder(path)
    assert not loaded.training and loaded.width == 0.0625
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(getattr(loaded, name), buffer, rtol=0, atol=0)
    # the buffers are the data-dependent ones, not the defaults of a fresh decoder
    assert not torch.equal(loaded.mean_texture, FaceDecoder(width=0.0625).mean_texture)
    features = features_like_training(model, batch=2)
    with torch.no_grad():
        expected, actual = model(features), loaded(features)
    for key in ("texture", "landmarks", "image"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_load_decoder_reports_a_missing_file_in_one_line(tmp_path) -> None:
    with pytest.raises(DecoderError) as caught:
        load_decoder(tmp_path / "absent.pt")
    message = str(caught.value)
    assert "absent.pt" in message and "not found" in message and "\n" not in message


def test_load_decoder_reports_another_width_in_one_line(tmp_path, mean_landmarks, mean_texture) -> None:
    """Weights of a width-0.125 decoder under settings that say 0.0625: a DecoderError whose
    one line names the mismatching tensor."""
    path = tmp_path / "face_decoder.pt"
    save_decoder(make_decoder(0.0625, mean_landmarks, mean_texture), path)
    torch.save(make_decoder(0.125, mean_landmarks, mean_texture).state_dict(), path)
    with pytest.raises(DecoderError) as caught:
        load_decoder(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "does not match face_decoder.json" in message and "size mismatch for" in message


def test_load_decoder_reports_an_unreadable_file_in_one_line(tmp_path, mean_landmarks, mean_texture) -> None:
    path = tmp_path / "face_decoder.pt"
    save_decoder(make_decoder(0.03125, mean_landmarks, mean_texture), path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(DecoderError) as caught:
        load_decoder(path)
    assert "not a readable state dict" in str(caught.value) and "\n" not in str(caught.value)
