"""dlib's 128-D face recognition network as a differentiable torch module.

dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (shipped offline by
face_recognition_models) is read directly with a pure-Python parser of dlib's binary
serialization, and ``DlibFaceNet`` reproduces the network's forward pass in torch, so a
face decoder can use dlib's embedding as an identity loss (gradients flow from the 128-D
embedding back to the input pixels). ``extract_face_chips`` is a differentiable, batched
equivalent of ``dlib.get_face_chip`` (150 x 150 aligned chips from 68 landmarks).

File format (read from the bytes of the file; dlib's serialize() conventions):

- integers: one header byte (low nibble: number of magnitude bytes, bit 0x80: negative),
  then the magnitude, little endian. ``int`` versions, sizes and shapes all use this.
- bool: one raw byte, ASCII ``'1'`` or ``'0'``.
- std::string: integer length, then the raw characters.
- float/double: integer mantissa, then integer exponent; value = mantissa * 2**exponent.
- tensor (version 2): version, num_samples, k, nr, nc, then num_samples*k*nr*nc raw
  little-endian float32 values.
- alias_tensor (a view into a layer's params): version 1, num_samples, k, nr, nc.
- the network: loss layer first (version 1, ``"loss_metric_2"``, margin, distance
  threshold), then the subnetwork. Each ``add_layer`` writes its version (2) and then its
  subnetwork *before* its own details, so the file starts with a chain of version numbers
  from the output layer inwards (2: a layer, 1: a tag or skip layer, which have no data of
  their own; 3: the first layer, whose subnetwork is the input layer), then the input layer
  (``"input_rgb_image_sized"``, mean R, G, B, rows, cols), then every layer's details from
  input to output, each followed by three bools and three (empty) scratch tensors (and,
  for the first layer only, the input's sample expansion factor, 1).
- layer details: ``con_4`` (params, num_filters, nr, nc, stride_y, stride_x, padding_y,
  padding_x, filter and bias aliases, four learning-rate/weight-decay multipliers),
  ``affine_`` (params = gamma then beta, their aliases, mode: 0 = per channel),
  ``relu_``, ``max_pool_2`` / ``avg_pool_2`` (nr, nc, stride_y, stride_x, padding_y,
  padding_x; nr = nc = 0 means the whole image), ``add_prev_``, ``fc_2`` (num_outputs,
  num_inputs, params as a num_inputs x num_outputs matrix, aliases, bias mode: 1 = no bias,
  four multipliers).

Tag and skip layers both appear only as a version 1 in the chain, and add_prev/skip do not
store which tag they refer to, so the wiring cannot be read from the file. It comes from
dlib's dnn_face_recognition_ex.cpp (the architecture below); the loader checks the parsed
sequence of layer kinds (with the positions of the tag/skip markers) against that
architecture, and every layer's shapes, strides and paddings against the module's, before
copying any weight.

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

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHIP_SIZE = 150
EMBEDDING_SIZE = 128


class DlibModelError(ValueError):
    """The dlib network file is missing or is not the face recognition network."""


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


class _Reader:
    """Sequential reader of dlib's serialization primitives."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibModelError(f"file ends early (wanted {n} bytes at offset {self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        header = self._take(1)[0]
        size = header & 0x0F
        if size > 8 or header & 0x70:
            raise DlibModelError(f"bad integer header 0x{header:02x} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if header & 0x80 else value

    def bool(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise DlibModelError(f"bad bool {byte!r} at offset {self.pos - 1}")
        return byte == b"1"

    def string(self) -> str:
        length = self.int()
        if not 0 <= length <= 64:
            raise DlibModelError(f"implausible string length {length} at offset {self.pos}")
        return self._take(length).decode("ascii", errors="replace")

    def real(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise DlibModelError(f"float out of range before offset {self.pos}") from None

    def shape4(self) -> tuple[int, int, int, int]:
        shape = (self.int(), self.int(), self.int(), self.int())
        if min(shape) < 0:
            raise DlibModelError(f"negative tensor shape {shape} before offset {self.pos}")
        return shape

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise DlibModelError(f"tensor version {version} at offset {self.pos}, expected 2")
        shape = self.shape4()
        count = math.prod(shape)
        values = np.frombuffer(self._take(4 * count), dtype="<f4")
        return values.reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise DlibModelError(f"alias_tensor version {version} at offset {self.pos}")
        return self.shape4()

    def expect(self, version_string: str) -> None:
        found = self.string()
        if found != version_string:
            raise DlibModelError(f"expected {version_string!r}, found {found!r} at offset {self.pos}")


@dataclass
class ParsedLayer:
    """One computational layer of the file: kind plus its numbers and arrays."""

    kind: str                     # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    config: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass
class ParsedNet:
    """The whole file: input normalisation, layers input->output, loss settings."""

    input_mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[ParsedLayer]
    # Input->output sequence of layer kinds with "tag|skip" where a tag or skip layer sits.
    structure: list[str]
    loss_margin: float
    loss_distance_threshold: float


def _read_multipliers(reader: _Reader) -> None:
    for _ in range(4):  # learning rate / weight decay multipliers: training only
        reader.real()


def _read_pool(reader: _Reader, kind: str) -> ParsedLayer:
    nr, nc, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
    return ParsedLayer(kind, dict(kernel=(nr, nc), stride=(stride_y, stride_x), padding=(pad_y, pad_x)))


def _read_layer_details(reader: _Reader) -> ParsedLayer:
    version = reader.string()
    if version == "con_4":
        params = reader.tensor()
        num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(7))
        filter_shape = reader.alias()
        bias_shape = reader.alias()
        _read_multipliers(reader)
        flat = params.reshape(-1)
        n_filter = int(np.prod(filter_shape))
        if filter_shape[0] != num_filters or filter_shape[2:] != (nr, nc) \
                or n_filter + int(np.prod(bias_shape)) != flat.size:
            raise DlibModelError(f"inconsistent con_4 shapes {filter_shape} {bias_shape} {params.shape}")
        return ParsedLayer("con", dict(kernel=(nr, nc), stride=(stride_y, stride_x), padding=(pad_y, pad_x)),
                           dict(weight=flat[:n_filter].reshape(filter_shape), bias=flat[n_filter:].copy()))
    if version == "affine_":
        params = reader.tensor()
        gamma_shape = reader.alias()
        beta_shape = reader.alias()
        mode = reader.int()
        if mode != 0 or gamma_shape[0] != 1 or gamma_shape[2:] != (1, 1) or gamma_shape != beta_shape:
            raise DlibModelError(f"unsupported affine_ layer (mode {mode}, gamma {gamma_shape})")
        flat = params.reshape(-1)
        channels = gamma_shape[1]
        if flat.size != 2 * channels:
            raise DlibModelError(f"affine_ params size {flat.size} for {channels} channels")
        return ParsedLayer("affine", {}, dict(gamma=flat[:channels].copy(), beta=flat[channels:].copy()))
    if version == "relu_":
        return ParsedLayer("relu")
    if version == "max_pool_2":
        return _read_pool(reader, "max_pool")
    if version == "avg_pool_2":
        return _read_pool(reader, "avg_pool")
    if version == "add_prev_":
        return ParsedLayer("add_prev")
    if version == "fc_2":
        num_outputs = reader.int()
        num_inputs = reader.int()
        params = reader.tensor()
        weight_shape = reader.alias()
        bias_shape = reader.alias()
        bias_mode = reader.int()
        _read_multipliers(reader)
        if bias_mode != 1 or weight_shape != (num_inputs, num_outputs, 1, 1) or np.prod(bias_shape) != 0:
            raise DlibModelError(f"unsupported fc_2 layer (bias mode {bias_mode}, weights {weight_shape})")
        # dlib computes output = input x W with W of shape (num_inputs, num_outputs).
        return ParsedLayer("fc", dict(num_outputs=num_outputs, num_inputs=num_inputs),
                           dict(weight=params.reshape(num_inputs, num_outputs).T.copy()))
    raise DlibModelError(f"unknown layer type {version!r} at offset {reader.pos}")


def parse_dlib_net(data: bytes) -> ParsedNet:
    """Parse the bytes of a dlib ``loss_metric`` network file (see the module docstring)."""
    reader = _Reader(data)
    if reader.int() != 1:
        raise DlibModelError("not a dlib loss layer (bad version at offset 0)")
    reader.expect("loss_metric_2")
    margin = reader.real()
    distance_threshold = reader.real()

    # Version chain, output layer first: 2 = add_layer, 1 = tag/skip, 3 = first layer.
    chain: list[int] = []
    while True:
        version = reader.int()
        if version not in (1, 2, 3):
            raise DlibModelError(f"unexpected layer version {version} at offset {reader.pos}")
        chain.append(version)
        if version == 3:
            break
        if len(chain) > 10_000:
            raise DlibModelError("no input layer found")

    reader.expect("input_rgb_image_sized")
    mean_rgb = (reader.real(), reader.real(), reader.real())
    input_size = (reader.int(), reader.int())

    layers: list[ParsedLayer] = []
    structure: list[str] = []
    for version in reversed(chain):
        if version == 1:
            structure.append("tag|skip")
            continue
        layer = _read_layer_details(reader)
        for _ in range(3):      # this_layer_setup_called, gradient_input_is_stale, ...disabled
            reader.bool()
        for _ in range(3):      # scratch tensors (x_grad, cached_output, params_grad): empty
            if reader.tensor().size:
                raise DlibModelError(f"unexpected non-empty scratch tensor before offset {reader.pos}")
        if version == 3:        # the first layer also stores the input's sample expansion factor
            if reader.int() != 1:
                raise DlibModelError(f"sample expansion factor is not 1 at offset {reader.pos}")
        layers.append(layer)
        structure.append(layer.kind)
    if reader.pos != len(data):
        raise DlibModelError(f"{len(data) - reader.pos} unparsed bytes at the end of the file")
    return ParsedNet(mean_rgb, input_size, layers, structure, margin, distance_threshold)


def default_model_path() -> str:
    """dlib_face_recognition_resnet_model_v1.dat from face_recognition_models (offline)."""
    from .faces import model_paths

    return model_paths()["resnet128"]


@functools.lru_cache(maxsize=4)
def _parse_file_cached(path: str, mtime_ns: int, size: int) -> ParsedNet:
    with open(path, "rb") as handle:
        data = handle.read()
    return parse_dlib_net(data)


def read_dlib_net(path: str | os.PathLike | None = None) -> ParsedNet:
    """Parse a network file once per process (cached on path, mtime and size)."""
    path = os.fspath(path) if path is not None else default_model_path()
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DlibModelError(f"dlib face model file not readable: {path} ({error.strerror})") from None
    try:
        return _parse_file_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    except (ValueError, OverflowError) as error:  # DlibModelError, or numpy on malformed arrays
        raise DlibModelError(f"not a dlib face recognition network: {path}: {error}") from None


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Face chips (differentiable dlib.get_face_chip)
# --------------------------------------------------------------------------------------

# dlib's mean face shape (get_face_chip_details in dlib/image_transforms/interpolation.h):
# points 17..67 of the 68-point layout in [0, 1] chip coordinates. dlib fits the chip to
# the points below only (it ignores the jaw, the eyebrows and the lower lip); these numbers
# and that selection reproduce dlib.get_face_chip_details to 1e-13 px (checked by the
# tests, and by moving each landmark in turn: only these 33 change the chip).
_MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689])
_MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182])
CHIP_LANDMARKS = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])

# pyramid_down<2>: 5-tap binomial filter, stride 2, valid; level pixel i sits at input
# pixel 2 i + 2, but dlib maps points with p/2 - (1.25, 0.75) (x, y), and so do we.
_PYRAMID_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)
_PYRAMID_SHIFT = (1.25, 0.75)


@dataclass
class ChipDetails:
    """dlib's chip_details of a batch: the chip's rect (centre, width) and angle.

    centre: (B, 2) image (x, y); width: (B,) the rect's width (dlib's right - left + 1);
    angle: (B,) radians. Chip pixel (c, r) samples the image at centre + R(angle) *
    k * ((c, r) - (size - 1) / 2) with k = (width - 1) / (size - 1).
    """

    centre: torch.Tensor
    width: torch.Tensor
    angle: torch.Tensor
    size: int


def face_chip_details(landmarks: torch.Tensor, size: int = CHIP_SIZE, padding: float = 0.25) -> ChipDetails:
    """dlib.get_face_chip_details for (B, 68, 2) landmarks (x, y), differentiably.

    The similarity transform from the padded mean face (in chip pixels) to the landmarks is
    the closed-form least-squares fit (dlib's find_similarity_transform gives the same).
    """
    dtype = torch.float64
    points = landmarks.to(dtype)[:, CHIP_LANDMARKS]                        # (B, 33, 2)
    mean_face = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], 1)[CHIP_LANDMARKS - 17]
    source = torch.as_tensor((padding + mean_face) / (2 * padding + 1) * size, dtype=dtype,
                             device=landmarks.device)                     # (33, 2)
    source_mean = source.mean(0)
    source_centred = source - source_mean
    target_mean = points.mean(1, keepdim=True)
    target_centred = points - target_mean
    norm = (source_centred ** 2).sum()
    # target ~ [[a, -b], [b, a]] source + t
    a = (source_centred * target_centred).sum((1, 2)) / norm
    b = (source_centred[:, 0] * target_centred[..., 1] - source_centred[:, 1] * target_centred[..., 0]).sum(1) / norm
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)   # (B, 2, 2)
    translation = target_mean[:, 0] - rotation @ source_mean
    # chip_details(from, to, dims): rect centred on the transform of the chip's centre
    # (size / 2, not (size - 1) / 2), width size * scale.
    chip_centre = torch.full((2,), size / 2.0, dtype=dtype, device=landmarks.device)
    centre = rotation @ chip_centre + translation
    return ChipDetails(centre, size * torch.hypot(a, b), torch.atan2(b, a), size)


def _chip_sample_points(details: ChipDetails, centre: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B, size, size, 2) (x, y) points sampled by chip pixels, for a centre and pixel step."""
    size = details.size
    offsets = torch.arange(size, dtype=centre.dtype, device=centre.device) - (size - 1) / 2.0
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = torch.cos(details.angle), torch.sin(details.angle)
    u = step.view(-1, 1, 1) * cols
    v = step.view(-1, 1, 1) * rows
    x = centre[:, 0, None, None] + cos.view(-1, 1, 1) * u - sin.view(-1, 1, 1) * v
    y = centre[:, 1, None, None] + sin.view(-1, 1, 1) * u + cos.view(-1, 1, 1) * v
    return torch.stack([x, y], -1)


def face_chip_grid(landmarks: torch.Tensor, image_size: tuple[int, int], size: int = CHIP_SIZE,
                   padding: float = 0.25) -> torch.Tensor:
    """grid_sample grid (B, size, size, 2) (align_corners=True) of dlib's face chip.

    Direct bilinear sampling of the full-resolution image, which is what dlib does while
    the chip's rect is under about twice the chip size (faces up to ~300 px across for a
    150 px chip); ``extract_face_chips`` adds dlib's pyramid for larger faces.
    """
    details = face_chip_details(landmarks, size, padding)
    points = _chip_sample_points(details, details.centre, (details.width - 1) / (size - 1))
    height, width = image_size
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    return points * scale - 1.0


def _sample_like_dlib(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of (B, C, H, W) at (B, h, w, 2) pixel points, dlib's way.

    dlib's interpolate_bilinear leaves a chip pixel black when any of its four neighbours
    lies outside the image (grid_sample would blend in zeros), hence the mask.
    """
    height, width = image.shape[-2:]
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    grid = (points * scale - 1.0).to(image.dtype)
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    corner = torch.floor(points.detach())
    inside = ((corner[..., 0] >= 0) & (corner[..., 1] >= 0)
              & (corner[..., 0] + 1 < width) & (corner[..., 1] + 1 < height))
    return sampled * inside.unsqueeze(1).to(image.dtype)


def _floor_straight_through(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def pyramid_down(image: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """dlib's pyramid_down<2> of (B, C, H, W): [1 4 6 4 1]/16 both ways, stride 2, valid.

    dlib computes it in integers for uint8 RGB images and truncates; ``quantize`` does the
    same in the forward pass and lets gradients through unchanged (straight-through).
    """
    channels = image.shape[1]
    taps = image.new_tensor(_PYRAMID_TAPS) / 16.0
    out = F.conv2d(image, taps.view(1, 1, 1, 5).expand(channels, 1, 1, 5).contiguous(),
                   stride=(1, 2), groups=channels)
    out = F.conv2d(out, taps.view(1, 1, 5, 1).expand(channels, 1, 5, 1).contiguous(),
                   stride=(2, 1), groups=channels)
    return _floor_straight_through(out) if quantize else out


def _pyramid_levels_needed(width: float, size: int) -> int:
    """How many times dlib halves the image first: rect_down until its area <= size^2."""
    levels = 0
    side = width  # rect side (right - left + 1); rect_down halves right - left
    while (side - 1) / 2 + 1 > size and levels < 30:
        side = (side - 1) / 2 + 1
        levels += 1
    return levels


def extract_face_chips(images: torch.Tensor, landmarks: torch.Tensor, size: int = CHIP_SIZE,
                       padding: float = 0.25, quantize: bool = False) -> torch.Tensor:
    """Differentiable dlib.get_face_chip: (B, C, H, W) float, (B, 68, 2) -> (B, C, size, size).

    Landmarks are pixel (x, y) with pixel centres at integer coordinates (dlib's); dlib's
    full_object_detection stores them as integers, so pass rounded ones to match dlib
    exactly. Gradients flow to the image and to the landmarks.

    Faces whose chip rect is more than about twice the chip size are first downsampled with
    dlib's pyramid_down<2>, applied to dlib's crop of the image (the rect's rotated corners
    grown by 2, 6, 14... px: the crop's position decides which pixels the pyramid keeps),
    as dlib's extract_image_chips does. For a uint8 image dlib truncates the pyramid levels
    and the chip to integers: ``quantize=True`` does the same in the forward pass
    (straight-through gradients), which makes the chip equal to dlib.get_face_chip's; by
    default the chip is left smooth (within 1 grey level of dlib's, 0.5 on average).
    """
    if images.dim() != 4 or landmarks.shape[1:] != (68, 2) or images.shape[0] != landmarks.shape[0]:
        raise ValueError(f"expected images (B, C, H, W) and landmarks (B, 68, 2), got "
                         f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
    details = face_chip_details(landmarks, size, padding)
    step = (details.width - 1) / (size - 1)
    height, width = images.shape[-2:]
    widths = details.width.detach().cpu().numpy()
    levels = [_pyramid_levels_needed(float(w), size) for w in widths]
    chips: list[torch.Tensor | None] = [None] * images.shape[0]
    direct = [i for i, n in enumerate(levels) if n == 0]
    if direct:
        index = torch.as_tensor(direct, device=images.device)
        sub = ChipDetails(details.centre[index], details.width[index], details.angle[index], size)
        points = _chip_sample_points(sub, sub.centre, step[index])
        sampled = _sample_like_dlib(images[index], points)
        for row, i in enumerate(direct):
            chips[i] = sampled[row]
    for i, n in enumerate(levels):
        if n == 0:
            continue
        # dlib's crop: the rect's rotated corners, grown by 2, 6, 14, ... px, in the image.
        centre = details.centre[i].detach().cpu().numpy()
        angle = float(details.angle[i])
        half = (float(widths[i]) - 1) / 2
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        corners = centre + np.array([[-half, -half], [half, -half], [-half, half], [half, half]]) @ rotation.T
        grow = 2.0
        for _ in range(n):
            grow = grow * 2 + 2
        left, top = np.maximum(corners.min(0) - grow, 0)
        right, bottom = np.minimum(corners.max(0) + grow, [width - 1, height - 1])
        left, top, right, bottom = (int(np.floor(v + 0.5)) for v in (left, top, right, bottom))
        level = images[i:i + 1, :, top:bottom + 1, left:right + 1]
        level_centre = details.centre[i:i + 1] - details.centre.new_tensor([left, top])
        shift = details.centre.new_tensor(_PYRAMID_SHIFT)
        for _ in range(n):
            level = pyramid_down(level, quantize)
            level_centre = level_centre / 2 - shift
        sub = ChipDetails(level_centre, details.width[i:i + 1], details.angle[i:i + 1], size)
        points = _chip_sample_points(sub, level_centre, step[i:i + 1] / 2 ** n)
        chips[i] = _sample_like_dlib(level, points)[0]
    result = torch.stack(chips)
    return _floor_straight_through(result) if quantize else result
