"""The picture around a portrait: backgrounds and landscapes, the person pasted on a
canvas with a drawn body (``build_scene``), the camera motion over the canvas, rendering a
frame, and the HOG face checks (``face_boxes``, ``face_at``).

The random draws here come from the identity's scene stream and carry no information about
the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from speech2face.sample_corpus.portraits import Portrait, shrink

FRAME_W, FRAME_H = 320, 240      # 4:3, so x and y fractions differ (catches swapped axes)
CANVAS_MARGIN = 16               # the static scene is this much larger on every side
CANVAS_W, CANVAS_H = FRAME_W + 2 * CANVAS_MARGIN, FRAME_H + 2 * CANVAS_MARGIN


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    from PIL import Image

    coarse = rng.random(cells).astype(np.float32)
    big = Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(big), 0.0, 1.0)


def make_background(rng: np.random.Generator) -> np.ndarray:
    """A studio-like backdrop: a vertical gradient between two colours plus soft blotches."""
    top, bottom = rng.uniform(0.15, 0.85, 3), rng.uniform(0.1, 0.7, 3)
    ramp = np.linspace(0.0, 1.0, CANVAS_H)[:, None, None]
    image = top * (1 - ramp) + bottom * ramp
    image = image * (0.85 + 0.3 * _smooth_noise(rng, CANVAS_H, CANVAS_W, (4, 5))[..., None])
    return np.broadcast_to(image, (CANVAS_H, CANVAS_W, 3)).clip(0, 1)


def make_landscape(rng: np.random.Generator) -> np.ndarray:
    """A scene with no face in it: sky, sun, two ranges of hills, a field."""
    ys, xs = np.mgrid[0:CANVAS_H, 0:CANVAS_W].astype(np.float64)
    sky = np.array([0.45, 0.65, 0.95]) * (1 - ys / CANVAS_H * 0.5)[..., None]
    image = np.broadcast_to(sky, (CANVAS_H, CANVAS_W, 3)).copy()
    sun = np.hypot(xs - 0.75 * CANVAS_W, ys - 0.2 * CANVAS_H) < 18
    image[sun] = (1.0, 0.93, 0.6)
    for level, colour, wiggle in ((0.45, (0.35, 0.45, 0.55), 25), (0.62, (0.25, 0.5, 0.25), 15)):
        phases = rng.uniform(0, 2 * np.pi, 3)
        ridge = CANVAS_H * level + wiggle * sum(np.sin(xs[0] / (30 + 25 * k) + p)
                                                for k, p in enumerate(phases)) / 3
        image[ys > ridge[None, :]] = colour
    texture = _smooth_noise(rng, CANVAS_H, CANVAS_W, (30, 40))[..., None]
    return (image * (0.9 + 0.2 * texture)).clip(0, 1)


def paste(canvas: np.ndarray, portrait: np.ndarray, alpha: np.ndarray, left: int, top: int) -> None:
    """Alpha-blend ``portrait`` onto ``canvas`` (in place) with its top-left at (left, top)."""
    h, w = portrait.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    part = portrait[y0 - top:y1 - top, x0 - left:x1 - left].astype(np.float64) / 255.0
    a = alpha[y0 - top:y1 - top, x0 - left:x1 - left]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + part * a


def draw_torso(canvas: np.ndarray, neck_x: float, chin_y: float, jaw_width: float,
               jacket: np.ndarray, shirt: np.ndarray) -> None:
    """Shoulders in a jacket over a shirt collar, under a head whose chin is at
    (neck_x, chin_y); drawn at 4x and filtered down for smooth edges (in place)."""
    from PIL import Image, ImageDraw

    k = 4
    h, w = canvas.shape[:2]
    body, collar = Image.new("L", (w * k, h * k), 0), Image.new("L", (w * k, h * k), 0)
    x, y, j = neck_x * k, chin_y * k, jaw_width * k
    draw = ImageDraw.Draw(body)
    draw.ellipse([x - 1.5 * j, y + 0.2 * j, x + 1.5 * j, y + 1.9 * j], fill=255)
    draw.polygon([(x - 1.5 * j, y + 1.05 * j), (x + 1.5 * j, y + 1.05 * j),
                  (x + 1.5 * j, h * k), (x - 1.5 * j, h * k)], fill=255)
    ImageDraw.Draw(collar).polygon([(x - 0.36 * j, y + 0.12 * j), (x + 0.36 * j, y + 0.12 * j),
                                    (x, y + 1.0 * j)], fill=255)
    for mask, colour in ((body, jacket), (collar, shirt)):
        a = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float64)[..., None] / 255.0
        shade = np.linspace(1.0, 0.8, h)[:, None, None]          # light from above
        canvas[:] = canvas * (1 - a) + (np.asarray(colour) * shade) * a


def paste_person(canvas: np.ndarray, portrait: Portrait, face_xy: tuple[float, float],
                 jacket: np.ndarray, shirt: np.ndarray) -> tuple[float, float]:
    """Draw body and head with the face centre at ``face_xy`` (canvas pixels, rounded to
    whole pixels); returns the exact face centre."""
    left = int(round(face_xy[0] - portrait.face_centre[0]))
    top = int(round(face_xy[1] - portrait.face_centre[1]))
    draw_torso(canvas, left + portrait.chin[0], top + portrait.chin[1], portrait.jaw_width,
               jacket, shirt)
    paste(canvas, portrait.image, portrait.alpha, left, top)
    return left + portrait.face_centre[0], top + portrait.face_centre[1]


@dataclass(frozen=True)
class Motion:
    """Slow zoom in, a small drift and a flicker of light, so consecutive frames differ."""

    duration: float
    zoom_end: float          # zoom at the end (1 at the start)
    drift_px: float          # amplitude of the pan
    drift_phase: float
    light_phase: float

    def at(self, t: float) -> tuple[float, float, float, float]:
        """zoom, pan x, pan y, brightness gain at time t."""
        u = t / self.duration
        zoom = 1.0 + (self.zoom_end - 1.0) * u
        pan_x = self.drift_px * math.sin(2 * math.pi * 0.5 * u + self.drift_phase)
        pan_y = 0.5 * self.drift_px * math.sin(2 * math.pi * 0.3 * u + self.drift_phase)
        gain = 1.0 + 0.04 * math.sin(2 * math.pi * t / 5.0 + self.light_phase)
        return zoom, pan_x, pan_y, gain

    def to_frame(self, t: float, canvas_xy: tuple[float, float]) -> tuple[float, float]:
        """Where a canvas point appears in the frame at time t (continuous coordinates, as
        PIL's transform uses them: pixel i spans [i, i+1))."""
        zoom, pan_x, pan_y, _ = self.at(t)
        x = (canvas_xy[0] - CANVAS_W / 2 - pan_x) * zoom + FRAME_W / 2
        y = (canvas_xy[1] - CANVAS_H / 2 - pan_y) * zoom + FRAME_H / 2
        return x, y


def draw_motion(rng: np.random.Generator, duration: float) -> Motion:
    return Motion(duration, zoom_end=float(rng.uniform(1.03, 1.08)),
                  drift_px=float(rng.uniform(3.0, 7.0)),
                  drift_phase=float(rng.uniform(0, 2 * np.pi)),
                  light_phase=float(rng.uniform(0, 2 * np.pi)))


def render_frame(canvas_image, motion: Motion, t: float) -> np.ndarray:
    """The frame at time t: the canvas (a PIL RGB image) zoomed, panned and lit."""
    from PIL import Image

    zoom, pan_x, pan_y, gain = motion.at(t)
    # Inverse of Motion.to_frame: PIL asks where each output pixel comes from.
    coeffs = (1 / zoom, 0.0, CANVAS_W / 2 + pan_x - FRAME_W / 2 / zoom,
              0.0, 1 / zoom, CANVAS_H / 2 + pan_y - FRAME_H / 2 / zoom)
    frame = canvas_image.transform((FRAME_W, FRAME_H), Image.AFFINE, coeffs, Image.BILINEAR)
    array = np.asarray(frame, dtype=np.float32) * gain
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def face_boxes(image: np.ndarray, upsample: int = 1) -> list[tuple[int, int, int, int]]:
    import face_recognition

    return face_recognition.face_locations(image, number_of_times_to_upsample=upsample, model="hog")


def face_at(image: np.ndarray, xy: tuple[float, float], upsample: int = 1,
            tolerance: float = 0.25) -> tuple[int, int, int, int] | None:
    """The HOG face (top, right, bottom, left) at ``xy``: the box whose centre is nearest
    to it, if that centre is within ``tolerance`` box widths (HOG boxes snap to a grid of
    ~1/8 of their size, so their centres wander by that much)."""
    best, best_distance = None, math.inf
    for box in face_boxes(image, upsample):
        top, right, bottom, left = box
        distance = math.hypot((left + right) / 2 - xy[0], (top + bottom) / 2 - xy[1])
        if distance < best_distance:
            best, best_distance = box, distance
    if best is None or best_distance > tolerance * (best[1] - best[3]):
        return None
    return best


def scene_layout(rng: np.random.Generator, with_distractor: bool) -> tuple[float, float]:
    """Where the face centre goes in the frame (off-centre for many identities)."""
    if with_distractor:      # main face to one side, the distractor takes the other
        fx = float(rng.choice([0.3, 0.7])) * FRAME_W
    else:
        fx = rng.uniform(0.3, 0.7) * FRAME_W
    fy = rng.uniform(0.42, 0.52) * FRAME_H
    return fx, fy


def draw_clothes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Jacket and shirt colours (nuisance: drawn from the scene stream, not the latent)."""
    jacket = rng.uniform(0.05, 0.55, 3)
    shirt = rng.uniform(0.75, 0.98, 3)
    return jacket, shirt


def build_scene(rng: np.random.Generator, portrait: Portrait,
                distractor: Portrait | None) -> tuple[np.ndarray, tuple[float, float]]:
    """A canvas with the person placed so the face lands at a drawn position.

    Returns the canvas and the face centre on it. Raises if HOG does not find that face.
    """
    canvas = make_background(rng).copy()
    fx, fy = scene_layout(rng, distractor is not None)
    if distractor is not None:
        # A second, smaller person (another identity) on the other side, higher up: x, y
        # must pick the right face.
        dx = (0.86 if fx < FRAME_W / 2 else 0.14) * FRAME_W + CANVAS_MARGIN
        dy = fy - 0.1 * FRAME_H + CANVAS_MARGIN
        paste_person(canvas, shrink(distractor, 0.5), (dx, dy), *draw_clothes(rng))
    face_xy = paste_person(canvas, portrait, (fx + CANVAS_MARGIN, fy + CANVAS_MARGIN),
                           *draw_clothes(rng))
    if face_at(np.round(canvas * 255).astype(np.uint8), face_xy) is None:
        raise RuntimeError(f"HOG does not find the pasted face at {face_xy}")
    return canvas, face_xy      # pixel-index coordinates on the canvas
