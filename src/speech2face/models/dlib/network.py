"""``DlibFaceNet``: dlib's face recognition ResNet's forward pass in torch, with dlib's weights.

Architecture (input to output): input_rgb_image_sized<150> ((pixel - mean RGB) / 256),
con<32,7,7,2,2> -> affine -> relu -> max_pool<3,3,2,2>; 3 x ares<32>; ares_down<64> +
3 x ares<64>; ares_down<128> + 2 x ares<128>; ares_down<256> + 2 x ares<256>;
ares_down<256>; avg_pool_everything; fc_no_bias<128>. block<N,s> = con<N,3,3,s,s> ->
affine -> relu -> con<N,3,3,1,1> -> affine; ares = relu(block(x) + x); ares_down =
relu(block_s2(x) + avg_pool<2,2,2,2>(x)). Two dlib behaviours matter: strided convolutions
and pools have no padding (the file stores it), and add_prev adds tensors of different
shapes by zero-padding both to the larger size in every dimension (channels, rows, cols),
aligned at index 0. In the first three ares_down the shortcut has half the channels
(zero-padded), and from 8 x 8 onwards the strided 3 x 3 convolution gives a smaller map than the 2 x 2 pool (8 -> 3 vs 4,
4 -> 1 vs 2), so the sum is the pool output with the block output added in its top-left.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from speech2face.models.dlib.chips import CHIP_SIZE
from speech2face.models.dlib.file_format import DlibModelError, ParsedNet, default_model_path, read_dlib_net

EMBEDDING_SIZE = 128


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: zero-pad both (B, C, H, W) tensors to the larger C, H, W, then add."""
    if a.shape == b.shape:
        return a + b
    channels, rows, cols = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, cols - t.shape[3], 0, rows - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """ares (stride 1, identity shortcut) or ares_down (stride 2, 2x2 average-pool shortcut).

    Each convolution carries the affine layer that follows it in dlib (folded at load).
    """

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        self.down = down
        stride = 2 if down else 1
        # dlib: padding kernel//2 for stride 1, 0 for stride != 1.
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_padded(y, shortcut))

    def dlib_structure(self) -> list[str]:
        block = ["con", "affine", "relu", "con", "affine"]
        if self.down:  # tag1, block, tag2, skip1, avg_pool, add_prev2, relu
            return ["tag|skip", *block, "tag|skip", "tag|skip", "avg_pool", "add_prev", "relu"]
        return ["tag|skip", *block, "add_prev", "relu"]  # tag1, block, add_prev1, relu


# (channels, downsample) of every residual block, input to output.
_RESIDUAL_PLAN = ([(32, False)] * 3
                  + [(64, True)] + [(64, False)] * 3
                  + [(128, True)] + [(128, False)] * 2
                  + [(256, True)] + [(256, False)] * 2
                  + [(256, True)])


class DlibFaceNet(nn.Module):
    """dlib's face recognition ResNet: (B, 3, 150, 150) RGB in 0..255 -> (B, 128).

    The input is an aligned face chip as ``dlib.get_face_chip`` or ``extract_face_chips``
    makes it (float, not rounded). The output equals ``face_recognition_model_v1.
    compute_face_descriptor(chip)`` (not re-normalised). dlib's affine layers (per-channel
    gamma * x + beta) are folded into the preceding convolutions, and weights and
    activations use the channels_last layout: on CPU (oneDNN) each makes the forward pass
    15-40% faster, with the same outputs to float rounding.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        blocks = []
        in_channels = 32
        for channels, down in _RESIDUAL_PLAN:
            blocks.append(ResidualBlock(in_channels, channels, down))
            in_channels = channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(in_channels, EMBEDDING_SIZE, bias=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = ((chips - self.input_mean) / 256.0).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.conv(x)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def dlib_structure(self) -> list[str]:
        """The input->output layer sequence dlib's file must have for this module."""
        structure = ["con", "affine", "relu", "max_pool"]
        for block in self.blocks:
            structure += block.dlib_structure()
        return structure + ["avg_pool", "fc"]

    def _convs_in_dlib_order(self) -> list[nn.Conv2d]:
        convs = [self.conv]
        for block in self.blocks:
            convs += [block.conv1, block.conv2]
        return convs

    @torch.no_grad()
    def load_parsed(self, net: ParsedNet) -> None:
        """Copy the weights of a parsed file, after checking it has exactly this architecture."""
        expected = self.dlib_structure()
        if net.structure != expected:
            raise DlibModelError(f"layer sequence differs from dlib's face recognition ResNet "
                                 f"({len(net.structure)} entries, expected {len(expected)})")
        if net.input_size != (CHIP_SIZE, CHIP_SIZE):
            raise DlibModelError(f"input size {net.input_size}, expected {CHIP_SIZE}")
        convs = [layer for layer in net.layers if layer.kind == "con"]
        affines = [layer for layer in net.layers if layer.kind == "affine"]
        for conv, parsed_conv, parsed_affine in zip(self._convs_in_dlib_order(), convs, affines):
            config = parsed_conv.config
            if (tuple(conv.weight.shape) != parsed_conv.arrays["weight"].shape
                    or config["stride"] != conv.stride or config["padding"] != conv.padding):
                raise DlibModelError(f"convolution {parsed_conv.arrays['weight'].shape} stride "
                                     f"{config['stride']} padding {config['padding']} does not fit "
                                     f"{tuple(conv.weight.shape)} {conv.stride} {conv.padding}")
            gamma, beta = parsed_affine.arrays["gamma"], parsed_affine.arrays["beta"]
            if gamma.shape != (conv.out_channels,):
                raise DlibModelError(f"affine size {gamma.shape} after {conv.out_channels} filters")
            # gamma * (W x + b) + beta == (gamma W) x + (gamma b + beta), folded in float64.
            weight = parsed_conv.arrays["weight"].astype(np.float64) * gamma[:, None, None, None]
            bias = parsed_conv.arrays["bias"].astype(np.float64) * gamma + beta
            conv.weight.copy_(torch.from_numpy(weight))
            conv.bias.copy_(torch.from_numpy(bias))
        pools = [layer.config for layer in net.layers if layer.kind in ("max_pool", "avg_pool")]
        expected_pools = ([dict(kernel=(3, 3), stride=(2, 2), padding=(0, 0))]
                          + [dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0))] * 4
                          + [dict(kernel=(0, 0), stride=(1, 1), padding=(0, 0))])
        if pools != expected_pools:
            raise DlibModelError(f"pooling layers differ from the expected ones: {pools}")
        fc = net.layers[-1].arrays["weight"]
        if fc.shape != tuple(self.fc.weight.shape):
            raise DlibModelError(f"fc weight shape {fc.shape}")
        self.fc.weight.copy_(torch.from_numpy(fc))
        self.input_mean.copy_(torch.tensor(net.input_mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))


def load_dlib_face_net(path: str | os.PathLike | None = None, trainable: bool = False) -> DlibFaceNet:
    """A DlibFaceNet with the weights of dlib's file (default: face_recognition_models').

    The parsed file is cached per process, so further calls only build the module and fold
    and copy weights (0.04-0.07 s on this project's CPUs, against 0.25 s more for the first
    parse).
    Weights are frozen (requires_grad False) unless ``trainable``; gradients still flow
    to the input. Raises DlibModelError (a ValueError) if the file is missing or does not
    parse as this network.
    """
    parsed = read_dlib_net(path)
    # Built on the CPU, random initialisation and all (0.04 s; every weight is overwritten
    # below): skipping it with the meta device and to_empty() costs 0.7 s more in a fresh
    # process (to_empty's first call imports torch's reference ops), paid by every
    # faces-stage worker at start. fork_rng: loading leaves the caller's random stream as is.
    with torch.random.fork_rng(devices=[]):
        net = DlibFaceNet()
    try:
        net.load_parsed(parsed)
    except DlibModelError as error:
        raise DlibModelError(f"not a dlib face recognition network: {path or default_model_path()}: "
                             f"{error}") from None
    net.requires_grad_(trainable)
    return net.to(memory_format=torch.channels_last).eval()
