"""Faces in video frames: detect (dlib HOG or CNN), choose, landmark, align, crop.

One clip gives a few RGB frames and the AVSpeech face centre (x, y), fractions of the frame
width and height. Per frame:

1. Detect. Frames larger than ``detect_max_side`` are scaled down for the detector only
   (boxes are mapped back). The detector starts at upsampling 0 and upsamples once more
   (up to ``upsample``) only while no detected box contains the point (x, y): a talking
   head in a <= 640 px frame is found at level 0 in a quarter of the time of level 1, and a
   small face still gets found at the higher level.
2. Choose the face whose box centre is nearest (x, y). A face farther than
   ``max_centre_offset`` box widths from (x, y) is not the annotated speaker (the speaker
   left the shot, or only a bystander was found): the frame counts as having no face.
3. 68 landmarks (dlib's shape predictor, run once per chosen face, on the full-size frame).
4. Align: a similarity transform (rotation, uniform scale, shift; no shear) fitted by least
   squares from five landmark points (the two eye centres, the nose tip, the two mouth
   corners) to ``CANONICAL_POINTS`` (dlib's mean face, eyes level at 0.40 of the height and
   0.26 of the width apart) makes the face upright and centred; the crop is
   ``crop_size`` x ``crop_size`` RGB uint8 (bilinear; black outside the frame) and the
   landmarks are mapped into it with the same transform.

Several frames per clip (``analyse_clip``):
- ``embed_frames="middle"`` (default; the paper uses one face per clip): frames are tried in
  order of distance from the middle of the segment and the first with a usable face gives
  the crop, the landmarks and the feature. One detection and one embedding per clip in the
  common case, which is what keeps this stage fast on a CPU (on this project's 2-core
  machines the embedding takes about 15-20 ms a face: dlib's chip plus dlib's network run
  in torch, see face_backends; dlib's own forward pass took 120-190 ms. The HOG detector
  takes about 40 ms a 640x480 frame, landmarks and alignment about 5 ms each).
- ``embed_frames="all"``: every frame is analysed and embedded; the clip feature is the
  mean of the frame features (re-normalised to unit length when the backend's features are
  normalised); the stored crop and landmarks come from the frame nearest the middle that
  had a face.
A clip with no usable face in any frame is skipped as ``no_face``, or as
``face_far_from_centre`` when faces were found but none near (x, y).

Coordinates: pixel centres sit at integer coordinates (dlib's convention), x to the right,
y down; boxes are (left, top, right, bottom) in that system.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from speech2face.models.dlib.weights import load_dlib_model

if TYPE_CHECKING:  # pragma: no cover
    from speech2face.data.face_backends import FaceBackend

DETECTORS = ("hog", "cnn")
EMBED_FRAMES = ("middle", "all")
N_LANDMARKS = 68

# dlib 68-point indices. "Left"/"right" are as seen in the image (image-left eye = the
# subject's right eye, points 36-41).
IMAGE_LEFT_EYE = slice(36, 42)
IMAGE_RIGHT_EYE = slice(42, 48)
NOSE_TIP = 30
MOUTH_IMAGE_LEFT = 48
MOUTH_IMAGE_RIGHT = 54

# Where the five alignment points go in the crop. Their proportions are those of dlib's
# mean face shape (the reference shape of dlib's get_face_chip_details, in
# dlib/image_transforms/interpolation.h: points 17-67 of the 68-point layout, normalised to
# [0, 1]); here the eye centres, the nose tip (point 30) and the mouth corners (48, 54)
# taken from it. Placement: eyes 0.26 of the crop apart, level at 0.40 of its height. Real
# faces measure about 2.0 eye distances from the eyes down to the chin and 2.3 across the
# jaw, so the crop holds the whole face (chin near 0.91, hairline near 0.1) with a margin,
# as VGG-Face (trained on loose crops) and the face decoder expect.
_DLIB_MEAN_FACE_FIVE = np.array([
    [0.2254918, 0.2159903],   # mean of points 36-41
    [0.7547613, 0.2159903],   # mean of points 42-47
    [0.490127, 0.515625],     # point 30
    [0.254149, 0.780233],     # point 48
    [0.726104, 0.780233],     # point 54
])
EYE_DISTANCE = 0.26
EYES_Y = 0.40


def _canonical_points() -> np.ndarray:
    mean = _DLIB_MEAN_FACE_FIVE
    eyes_mid = (mean[0] + mean[1]) / 2
    scale = EYE_DISTANCE / (mean[1, 0] - mean[0, 0])
    return (mean - eyes_mid) * scale + np.array([0.5, EYES_Y])


# (5, 2): image-left eye, image-right eye, nose tip, mouth image-left, mouth image-right,
# as fractions of the crop size.
CANONICAL_POINTS = _canonical_points()


@dataclass
class AlignedFace:
    """One chosen face of one frame."""
    crop: np.ndarray              # (S, S, 3) uint8, aligned
    landmarks: np.ndarray         # (68, 2) float32, crop coordinates
    frame_landmarks: np.ndarray   # (68, 2) float32, frame coordinates
    box: tuple[float, float, float, float]   # (left, top, right, bottom) in the frame
    frame_index: int
    faces_in_frame: int           # how many faces the detector found in this frame
    frame: np.ndarray | None = None   # the source frame; dropped before crossing processes


@dataclass
class FrameOutcome:
    """What one frame gave: a face, or why not."""
    face: AlignedFace | None
    faces_in_frame: int
    reason: str = ""              # "" | "no_face" | "face_far_from_centre"


@dataclass
class ClipFaces:
    """The faces of one clip (see the module notes for how frames combine)."""
    faces: list[AlignedFace]      # the frames used for the feature, middle-most first
    frames_examined: int
    faces_in_frame: int           # most faces the detector found in one examined frame
    reason: str = ""              # "" when faces is non-empty
    feature: np.ndarray | None = None    # (dim,) float32 once embedded
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.faces)

    @property
    def representative(self) -> AlignedFace:
        return self.faces[0]


# ---------------------------------------------------------------------------- geometry

def box_centre(box: Sequence[float]) -> tuple[float, float]:
    left, top, right, bottom = box
    return (left + right) / 2.0, (top + bottom) / 2.0


def box_contains(box: Sequence[float], point: tuple[float, float]) -> bool:
    left, top, right, bottom = box
    return left <= point[0] <= right and top <= point[1] <= bottom


def nearest_box(boxes: Sequence[Sequence[float]], point: tuple[float, float]) -> int:
    """Index of the box whose centre is nearest ``point`` (-1 when there are none)."""
    if not boxes:
        return -1
    distances = [np.hypot(*(np.subtract(box_centre(b), point))) for b in boxes]
    return int(np.argmin(distances))


def centre_offset(box: Sequence[float], point: tuple[float, float]) -> float:
    """Distance from ``point`` to the box centre, in box widths."""
    width = max(box[2] - box[0], 1.0)
    return float(np.hypot(*(np.subtract(box_centre(box), point)))) / width


def alignment_points(landmarks: np.ndarray) -> np.ndarray:
    """The five points of ``CANONICAL_POINTS`` taken from 68 landmarks, (5, 2)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    return np.stack([
        landmarks[IMAGE_LEFT_EYE].mean(axis=0),
        landmarks[IMAGE_RIGHT_EYE].mean(axis=0),
        landmarks[NOSE_TIP],
        landmarks[MOUTH_IMAGE_LEFT],
        landmarks[MOUTH_IMAGE_RIGHT],
    ])


def fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3 matrix M = [[a, -b, tx], [b, a, ty]] minimising sum |M [p; 1] - q|^2.

    A similarity (rotation + uniform scale + shift) keeps the face's proportions; with
    only five points a full affine fit would also shear the face to fit the template.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    n = len(source)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([source[:, 0], -source[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([source[:, 1], source[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_to_crop(frame: np.ndarray, matrix: np.ndarray, crop_size: int) -> np.ndarray:
    """Resample ``frame`` so that frame point p lands at crop point M p (bilinear).

    PIL's affine transform maps output to input in pixel-corner coordinates (pixel i spans
    [i, i + 1]); the half-pixel terms convert from our pixel-centre convention.
    """
    linear, shift = matrix[:, :2], matrix[:, 2]
    inverse = np.linalg.inv(linear)
    inverse_shift = -inverse @ shift
    a, b = inverse[0]
    d, e = inverse[1]
    c = inverse_shift[0] + 0.5 - 0.5 * (a + b)
    f = inverse_shift[1] + 0.5 - 0.5 * (d + e)
    image = Image.fromarray(np.ascontiguousarray(frame))
    warped = image.transform((crop_size, crop_size), Image.Transform.AFFINE, (a, b, c, d, e, f),
                             resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(warped, dtype=np.uint8)


def align_face(frame: np.ndarray, landmarks: np.ndarray, crop_size: int = 224
               ) -> tuple[np.ndarray, np.ndarray]:
    """(crop (S, S, 3) uint8, landmarks in crop coordinates (68, 2) float32)."""
    matrix = fit_similarity(alignment_points(landmarks), CANONICAL_POINTS * crop_size)
    crop = warp_to_crop(frame, matrix, crop_size)
    return crop, apply_transform(matrix, landmarks).astype(np.float32)


def combine_features(features: np.ndarray, normalised: bool) -> np.ndarray:
    """Clip feature from frame features (k, dim): the mean, re-normalised if they were."""
    mean = np.asarray(features, dtype=np.float64).mean(axis=0)
    if normalised:
        mean /= max(np.linalg.norm(mean), 1e-12)
    return mean.astype(np.float32)


# ---------------------------------------------------------------------------- analysis

class FaceAnalyzer:
    """dlib detector + 68-point shape predictor, loaded once (per worker process)."""

    def __init__(self, detector: str = "hog", upsample: int = 1, crop_size: int = 224,
                 detect_max_side: int | None = 640, max_centre_offset: float | None = 1.0):
        import dlib

        if detector not in DETECTORS:
            raise ValueError(f"unknown face detector {detector!r}: expected one of {list(DETECTORS)}")
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        self.detector_name = detector
        self.upsample = upsample
        self.crop_size = crop_size
        self.detect_max_side = detect_max_side
        self.max_centre_offset = max_centre_offset
        self._detector = load_dlib_model(detector)
        self._predictor = load_dlib_model("landmarks68")
        self._dlib = dlib

    # -- detection
    def _detect_at(self, image: np.ndarray, upsample: int) -> list[tuple[float, float, float, float]]:
        found = self._detector(image, upsample)
        rects = [d.rect for d in found] if self.detector_name == "cnn" else list(found)
        return [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]

    def detect(self, frame: np.ndarray, point: tuple[float, float] | None = None
               ) -> list[tuple[float, float, float, float]]:
        """Face boxes in frame coordinates (see the module notes for the upsampling rule)."""
        frame = np.ascontiguousarray(frame)
        height, width = frame.shape[:2]
        scale = 1.0
        image = frame
        if self.detect_max_side and max(height, width) > self.detect_max_side:
            scale = self.detect_max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
        small_point = None if point is None else ((point[0] + 0.5) * scale - 0.5, (point[1] + 0.5) * scale - 0.5)
        boxes: list[tuple[float, float, float, float]] = []
        for level in range(self.upsample + 1):
            # A higher level that finds nothing (rare) keeps the lower level's faces.
            boxes = self._detect_at(image, level) or boxes
            if boxes and (small_point is None or any(box_contains(b, small_point) for b in boxes)):
                break
        if scale == 1.0:
            return [tuple(float(v) for v in b) for b in boxes]
        # Box (l, t, r, b) covers pixels l..r; map the pixel span back, not the coordinates.
        return [((l + 0.5) / scale - 0.5, (t + 0.5) / scale - 0.5,
                 (r + 0.5) / scale - 0.5, (b + 0.5) / scale - 0.5) for l, t, r, b in boxes]

    # -- landmarks
    def landmarks(self, frame: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """68 (x, y) points, float32."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(np.ascontiguousarray(frame), rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    # -- one frame
    def analyse_frame(self, frame: np.ndarray, x: float, y: float, frame_index: int = 0,
                      seconds: dict[str, float] | None = None) -> FrameOutcome:
        """The face nearest (x, y) (fractions of width/height), aligned, or why not."""
        seconds = seconds if seconds is not None else {}
        height, width = frame.shape[:2]
        point = (x * width - 0.5, y * height - 0.5)   # fraction of the frame -> pixel-centre coords
        started = time.perf_counter()
        boxes = self.detect(frame, point)
        _add(seconds, "detect", started)
        if not boxes:
            return FrameOutcome(None, 0, "no_face")
        chosen = boxes[nearest_box(boxes, point)]
        if self.max_centre_offset is not None and centre_offset(chosen, point) > self.max_centre_offset:
            return FrameOutcome(None, len(boxes), "face_far_from_centre")
        started = time.perf_counter()
        frame_landmarks = self.landmarks(frame, chosen)
        _add(seconds, "landmarks", started)
        started = time.perf_counter()
        crop, crop_landmarks = align_face(frame, frame_landmarks, self.crop_size)
        _add(seconds, "align", started)
        face = AlignedFace(crop=crop, landmarks=crop_landmarks, frame_landmarks=frame_landmarks,
                           box=chosen, frame_index=frame_index, faces_in_frame=len(boxes), frame=frame)
        return FrameOutcome(face, len(boxes))

    # -- one clip
    def analyse_clip(self, frames: Sequence[np.ndarray], x: float, y: float,
                     backend: "FaceBackend | None" = None, embed_frames: str = "middle") -> ClipFaces:
        """Faces of a clip; embedded with ``backend`` when given (else ``feature`` is None)."""
        if embed_frames not in EMBED_FRAMES:
            raise ValueError(f"embed_frames must be one of {list(EMBED_FRAMES)}, got {embed_frames!r}")
        seconds: dict[str, float] = {}
        faces: list[AlignedFace] = []
        reasons: list[str] = []
        most_faces = 0
        examined = 0
        for index in frames_by_closeness_to_middle(len(frames)):
            outcome = self.analyse_frame(frames[index], x, y, index, seconds)
            examined += 1
            most_faces = max(most_faces, outcome.faces_in_frame)
            if outcome.face is None:
                reasons.append(outcome.reason)
                continue
            faces.append(outcome.face)
            if embed_frames == "middle":
                break
        reason = ""
        if not faces:
            # "face_far_from_centre" only when some frame had faces, all of them elsewhere.
            reason = "face_far_from_centre" if "face_far_from_centre" in reasons else "no_face"
        clip = ClipFaces(faces=faces, frames_examined=examined, faces_in_frame=most_faces,
                         reason=reason, seconds=seconds)
        if backend is not None and clip.ok:
            embed_clip(clip, backend)
        return clip


def embed_clip(clip: ClipFaces, backend: "FaceBackend") -> None:
    """Fill ``clip.feature`` from its faces (frames dropped afterwards: they are large)."""
    started = time.perf_counter()
    features = backend.embed(clip.faces)
    clip.feature = combine_features(features, backend.normalised)
    _add(clip.seconds, "embed", started)
    for face in clip.faces:
        face.frame = None


def frames_by_closeness_to_middle(n: int) -> list[int]:
    """Frame indices, nearest the middle of the segment first (earlier wins a tie)."""
    middle = (n - 1) / 2.0
    return sorted(range(n), key=lambda i: (abs(i - middle), i))


def _add(seconds: dict[str, float], key: str, started: float) -> None:
    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
