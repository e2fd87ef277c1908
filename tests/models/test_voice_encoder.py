"""Voice encoder architecture (paper Table 1)."""

from __future__ import annotations

import torch
from torch import nn

from speech2face.models.voice_encoder import VoiceEncoder, count_parameters, frequency_bins_after_convs


def test_full_size_parameter_count_matches_reference() -> None:
    model = VoiceEncoder(out_dim=4096, width=1.0)
    trainable, total = count_parameters(model)
    assert trainable == 148_062_976
    assert total == 148_067_584  # + 4,608 batch-norm running means and variances
    assert total - trainable == 2 * sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_pooling_never_shrinks_frequency_and_any_length_works() -> None:
    model = VoiceEncoder(out_dim=32, width=0.0625).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.kernel_size == (2, 1) and p.stride == (2, 1) for p in pools)
    shapes = []
    hook = model.convs.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        for frames in (598, 300, 1000):
            out = model(torch.randn(2, frames, 257, 2))
            assert out.shape == (2, 32)
    hook.remove()
    # frequency after the convs depends only on the frequency input (257 -> 57), never on time
    assert {s[3] for s in shapes} == {frequency_bins_after_convs(257)} == {57}
    assert len({s[2] for s in shapes}) == 3  # time differs by input length (then averaged away)


def test_time_axis_is_averaged_not_flattened() -> None:
    """Repeating a clip in time leaves the (time-averaged) output nearly unchanged."""
    torch.manual_seed(0)
    model = VoiceEncoder(out_dim=16, width=0.0625).eval()
    x = torch.randn(1, 598, 257, 2)
    with torch.no_grad():
        single, double = model(x), model(torch.cat([x, x], dim=1))
    assert torch.nn.functional.cosine_similarity(single, double).item() > 0.95


def test_magnitude_input_mode_drops_one_input_channel() -> None:
    complex_model = VoiceEncoder(out_dim=64, width=0.0625)
    magnitude_model = VoiceEncoder(out_dim=64, width=0.0625, input_mode="magnitude")
    first = magnitude_model.convs[0]
    assert first.in_channels == 1
    assert count_parameters(complex_model)[0] - count_parameters(magnitude_model)[0] == 4 * 4 * first.out_channels
    x = torch.randn(1, 300, 257, 2)
    flipped = x * torch.tensor([-1.0, 1.0])  # sign of the real part: same magnitude
    magnitude_model.eval()
    with torch.no_grad():
        assert torch.allclose(magnitude_model(x), magnitude_model(flipped), atol=1e-5)
