"""Face feature networks behind one interface (``FaceBackend``).

- ``dlib128`` (default, offline): dlib's 128-D ResNet face embedding (99.38% on LFW), the
  network behind ``face_recognition.face_encodings``. dlib aligns the 150x150 chip from the
  frame and the 68 landmarks (``dlib.get_face_chip``, padding 0.25: what dlib's
  ``compute_face_descriptor(frame, shape)`` does internally), and the descriptor comes from
  ``DlibFaceNet`` (speech2face.models.dlib): the same network with the same weights, read
  from dlib's own .dat file, run in torch with one thread. That is 7-13x faster on this
  project's 2-core CPUs (per face: ``compute_face_descriptor`` 130-170 ms; dlib's chip
  0.5 ms plus the torch forward 12-21 ms; in the faces stage with 2 workers the embed step
  went from 110-190 ms to 16-21 ms a face) and gives the same features: over 278 real faces
  (270 video frames, 8 photo faces) at most 4.8e-7 from dlib's in any component (float32
  rounding; components are about 0.1, different faces 0.09 apart or more). The price is
  torch's import in each worker process, about 2 s once at its start.
  ``Dlib128Backend(network="dlib")`` keeps dlib's own forward pass (the reference; needed
  for ``num_jitters`` > 1). Either way this equals ``face_recognition.face_encodings(frame,
  [box], model="large")`` (to float32 rounding) without running the landmark model a second
  time. Features are not unit length (norm about 1.4); compare them with the Euclidean
  distance (same person below about 0.6).
- ``vggface4096`` (the paper's feature): VGG-Face (Parkhi et al., BMVC 2015), VGG-16 with
  2622 identity classes, in torch. Input: the aligned 224x224 RGB crop in [0, 255] minus
  the VGG-Face mean colour. Feature = fc7 after its ReLU (4096-D, non-negative): the paper
  takes fc7, and after the ReLU is exactly what fc8 consumes, so ``logits(feature)`` =
  fc8(feature) is the paper's f_VGG for the distillation loss. No weights ship: the user
  supplies a state dict (``vggface_weights``). Layer names follow the widely used
  ``vgg_face_dag.pth`` conversion (conv1_1 ... conv5_3, fc6, fc7, fc8), which loads as is.

``make_backend(name, vggface_weights)`` builds one; it raises ``BackendError`` (one line)
for an unknown name or unusable weights.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from speech2face.core.errors import Speech2FaceError

if TYPE_CHECKING:  # pragma: no cover
    from speech2face.data.face_analysis import AlignedFace

BACKENDS = ("dlib128", "vggface4096")

# VGG-Face's mean colour (RGB, 0-255), from the original release.
VGGFACE_MEAN_RGB = (129.186279296875, 104.76238250732422, 93.59396362304688)
VGGFACE_CLASSES = 2622
VGGFACE_INPUT_SIZE = 224


class BackendError(Speech2FaceError, ValueError):
    """A face backend cannot be built (unknown name, missing or incompatible weights)."""


class FaceBackend:
    """``embed(faces) -> (n, dim) float32``; optionally ``logits(features)``.

    ``in_worker``: cheap to load and per-face, so the stage runs it inside its worker
    processes; otherwise the stage batches aligned crops through it in the main process
    (a 145 M parameter network should be loaded once, and batched, on a GPU if present).
    """

    name: str = ""
    dim: int = 0
    normalised: bool = False     # unit-length features (the clip mean is re-normalised)
    in_worker: bool = True
    has_logits: bool = False

    def embed(self, faces: Sequence["AlignedFace"]) -> np.ndarray:
        raise NotImplementedError

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 aligned crops -> (n, dim); for backends that need only crops."""
        raise NotImplementedError(f"{self.name} needs the source frame, not only the crop")

    def logits(self, features: Any) -> Any:
        raise NotImplementedError(f"face backend {self.name} has no classifier logits")


DLIB_NETWORKS = ("torch", "dlib")
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25    # compute_face_descriptor's default padding


@functools.lru_cache(maxsize=None)
def _dlib_face_net():
    """DlibFaceNet with dlib's weights, loaded once per process (about 0.3 s) and shared: it is
    frozen and only run under inference_mode, so backends cannot change it."""
    from speech2face.models.dlib.network import load_dlib_face_net

    return load_dlib_face_net()


@contextlib.contextmanager
def _torch_threads(torch, threads: int | None):
    """Run torch with ``threads`` intra-op threads inside the block, restored afterwards.

    The faces stage gets its parallelism from worker processes; a torch forward on two
    threads in each of them (torch's default in a spawned worker on these 2-core machines)
    oversubscribes the cores and ran 4-7x slower than one thread when the machine was busy.
    Scoped, not set once per process: with one worker the backend runs in the stage's own
    process, whose thread setting is not this backend's to change. Switching costs nothing
    measurable (a forward with a switch before and after times the same as one without).
    """
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Dlib128Backend(FaceBackend):
    """dlib's 128-D face descriptor of each face (see the module notes).

    ``network``: "torch" (default) computes the descriptor of dlib's chip with DlibFaceNet
    on ``torch_threads`` threads, all faces of one ``embed`` call in one forward pass;
    "dlib" calls dlib's ``compute_face_descriptor(frame, shape, num_jitters)`` per face.
    """

    name = "dlib128"
    dim = 128
    normalised = False
    in_worker = True

    def __init__(self, num_jitters: int = 1, network: str = "torch", torch_threads: int | None = 1):
        import dlib

        from speech2face.models.dlib.weights import load_dlib_model

        if network not in DLIB_NETWORKS:
            raise BackendError(f"dlib128: unknown network {network!r}: expected one of {list(DLIB_NETWORKS)}")
        # dlib jitters (random crops and flips of the chip, averaged) only when num_jitters > 1.
        if num_jitters > 1 and network != "dlib":
            raise BackendError(f"dlib128: num_jitters={num_jitters} needs network='dlib' "
                               "(the torch network computes the unjittered descriptor only)")
        self._dlib = dlib
        self.network = network
        self.num_jitters = num_jitters
        self.torch_threads = torch_threads
        if network == "dlib":
            self._model = load_dlib_model("resnet128")
            return
        import torch

        from speech2face.models.dlib.file_format import DlibModelError

        self._torch = torch
        try:
            # Loaded here, not at the first face: the stage turns a ValueError inside a clip
            # into that clip's skip reason, so a bad model file must fail the start instead.
            self._net = _dlib_face_net()
        except DlibModelError as error:
            raise BackendError(f"dlib128: {error}") from None

    def embed(self, faces: Sequence["AlignedFace"]) -> np.ndarray:
        features = np.zeros((len(faces), self.dim), dtype=np.float32)
        if not faces:
            return features
        frames, shapes = [], []
        for face in faces:
            if face.frame is None:
                raise ValueError("dlib128 embeds from the source frame; this face no longer has it")
            frames.append(np.ascontiguousarray(face.frame))
            shapes.append(self._shape(face))
        if self.network == "dlib":
            for i, (frame, shape) in enumerate(zip(frames, shapes)):
                features[i] = np.asarray(self._model.compute_face_descriptor(frame, shape, self.num_jitters),
                                         dtype=np.float32)
            return features
        chips = np.stack([self._dlib.get_face_chip(frame, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING)
                          for frame, shape in zip(frames, shapes)])     # (n, 150, 150, 3) uint8 RGB
        torch = self._torch
        with _torch_threads(torch, self.torch_threads), torch.inference_mode():
            # NHWC permuted to NCHW is already the channels_last layout the network uses.
            images = torch.from_numpy(chips).permute(0, 3, 1, 2).float()
            features[:] = self._net(images).numpy()
        return features

    def _shape(self, face: "AlignedFace"):
        dlib = self._dlib
        rect = dlib.rectangle(*(int(round(v)) for v in face.box))
        points = dlib.points()
        for x, y in face.frame_landmarks:
            points.append(dlib.point(int(round(float(x))), int(round(float(y)))))
        return dlib.full_object_detection(rect, points)


def build_vggface():
    """VGG-16 for 2622 face identities (torch ``nn.Module``), randomly initialised.

    Build it under ``torch.device("meta")`` to skip the initialisation when weights are
    loaded right after (``load_vggface_weights`` assigns the loaded tensors).
    """
    import torch
    from torch import nn

    class VGGFace(nn.Module):
        """VGG-Face: 13 conv 3x3 (+ReLU) in 5 blocks with 2x2 max pools, fc6, fc7, fc8."""

        blocks = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

        def __init__(self, num_classes: int = VGGFACE_CLASSES):
            super().__init__()
            in_channels = 3
            self.conv_names: list[list[str]] = []
            for b, widths in enumerate(self.blocks, start=1):
                names = []
                for c, width in enumerate(widths, start=1):
                    name = f"conv{b}_{c}"
                    setattr(self, name, nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
                    names.append(name)
                    in_channels = width
                self.conv_names.append(names)
            self.fc6 = nn.Linear(512 * 7 * 7, 4096)
            self.fc7 = nn.Linear(4096, 4096)
            self.fc8 = nn.Linear(4096, num_classes)

        def features(self, images: "torch.Tensor") -> "torch.Tensor":
            """(n, 3, 224, 224) float RGB in [0, 255] -> fc7 after ReLU, (n, 4096)."""
            mean = torch.tensor(VGGFACE_MEAN_RGB, dtype=images.dtype, device=images.device)
            x = images - mean.view(1, 3, 1, 1)
            for names in self.conv_names:
                for name in names:
                    x = torch.relu(getattr(self, name)(x))
                x = nn.functional.max_pool2d(x, kernel_size=2, stride=2)
            x = torch.flatten(x, 1)      # (C, H, W) order, as vgg_face_dag.pth expects
            x = torch.relu(self.fc6(x))  # dropout layers of training are identities here
            return torch.relu(self.fc7(x))

        def logits(self, features: "torch.Tensor") -> "torch.Tensor":
            return self.fc8(features)

        def forward(self, images: "torch.Tensor") -> "torch.Tensor":
            return self.logits(self.features(images))

    return VGGFace()


def load_vggface_weights(model, path: str | Path) -> None:
    """Load a state dict file into ``model``; ``BackendError`` with one clear line if unusable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BackendError(f"vggface4096: weights file {str(path)!r} not found "
                           "(set faces.vggface_weights to a VGG-Face state dict)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a corrupt file, or a pickled full model (refused by weights_only)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackendError(f"vggface4096: cannot read {str(path)!r} as a state dict: {message[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackendError(f"vggface4096: {str(path)!r} is not a state dict of tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes {_first(wrong_shape)}")
    if problems:
        raise BackendError(f"vggface4096: {str(path)!r} does not fit VGG-Face: " + "; ".join(problems))
    # Conversions sometimes store float16/float64: compute in float32 like the model.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    # assign: the loaded tensors become the parameters (a model built on the meta device
    # then needs no memory or random initialisation of its own).
    model.load_state_dict(state, assign=True)


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


class VGGFace4096Backend(FaceBackend):
    name = "vggface4096"
    dim = 4096
    normalised = False
    in_worker = False
    has_logits = True

    def __init__(self, weights: str | Path, device: str | None = None, batch_size: int = 16):
        import torch

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        with torch.device("meta"):
            model = build_vggface()
        load_vggface_weights(model, weights)
        self.model = model.eval().to(self.device)

    def embed(self, faces: Sequence["AlignedFace"]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_crops(np.stack([face.crop for face in faces]))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        torch = self._torch
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (VGGFACE_INPUT_SIZE, VGGFACE_INPUT_SIZE, 3):
            raise ValueError(f"vggface4096 needs (n, 224, 224, 3) crops, got {crops.shape}")
        out = np.zeros((len(crops), self.dim), dtype=np.float32)
        autocast = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            for start in range(0, len(crops), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(crops[start:start + self.batch_size]))
                images = batch.to(self.device).permute(0, 3, 1, 2).float()
                out[start:start + len(batch)] = self.model.features(images).float().cpu().numpy()
        return out

    def logits(self, features):
        """fc8 of (n, 4096) features (numpy or tensor; a tensor keeps its gradient)."""
        torch = self._torch
        if isinstance(features, np.ndarray):
            with torch.inference_mode():
                return self.model.logits(torch.from_numpy(features).to(self.device)).cpu().numpy()
        return self.model.logits(features)


def make_backend(name: str, vggface_weights: str | Path | None = None, **kwargs) -> FaceBackend:
    if name == "dlib128":
        return Dlib128Backend(**kwargs)
    if name == "vggface4096":
        if not vggface_weights:
            raise BackendError("vggface4096 needs a VGG-Face state dict: set faces.vggface_weights "
                               "(no weights ship with this project)")
        return VGGFace4096Backend(vggface_weights, **kwargs)
    raise BackendError(f"unknown face backend {name!r}: expected one of {list(BACKENDS)}")


def backend_class(name: str) -> type[FaceBackend]:
    """The class (name, dim, normalised, in_worker) without loading any model."""
    classes = {"dlib128": Dlib128Backend, "vggface4096": VGGFace4096Backend}
    if name not in classes:
        raise BackendError(f"unknown face backend {name!r}: expected one of {list(BACKENDS)}")
    return classes[name]
