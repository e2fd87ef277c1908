"""Parser of dlib's binary network files -> ``ParsedNet`` (arrays per layer, checked structure).

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
dlib's dnn_face_recognition_ex.cpp (see speech2face.models.dlib.network); the loader checks the
parsed sequence of layer kinds (with the positions of the tag/skip markers) against that
architecture, and every layer's shapes, strides and paddings against the module's, before
copying any weight.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np

from speech2face.core.errors import Speech2FaceError
from speech2face.models.dlib.weights import model_paths


class DlibModelError(Speech2FaceError, ValueError):
    """The dlib network file is missing or is not the face recognition network."""


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
