"""An identity's face: the three base portraits (aligned on dlib landmarks), the
piecewise-affine morph of them by the identity's ``FaceParams``, and the head cut out of
the morph (``Portrait``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from speech2face.sample_corpus.identities import FaceParams

# The morphed portrait (head and neck are cut out of it).
PORTRAIT_W, PORTRAIT_H = 192, 240
# Eye centres in the portrait: an inter-ocular distance of 40 px gives HOG face boxes of
# ~100 px (HOG needs ~80 px at upsample 0, ~40 px at upsample 1).
EYE_LEFT = (PORTRAIT_W / 2 - 20.0, 100.0)
EYE_RIGHT = (PORTRAIT_W / 2 + 20.0, 100.0)

# (person, file in the shared media folder). The two extra photos of Obama and Biden are
# left out: a base "person" must be one photo so the morph weights mean one face each.
BASE_PEOPLE = (("obama", "obama.jpg"), ("biden", "biden2.jpg"), ("collins", "astronaut.png"))


@dataclass(frozen=True)
class BaseFace:
    """One base person's portrait, aligned so the eyes sit at EYE_LEFT / EYE_RIGHT."""

    name: str
    image: np.ndarray       # (PORTRAIT_H, PORTRAIT_W, 3) float32 in [0, 1]
    landmarks: np.ndarray   # (78, 2) x, y: dlib's 68 points + 10 forehead points


def detect_landmarks(image: np.ndarray, detect_side: int = 500) -> np.ndarray:
    """dlib's 68 landmarks (x, y) of the largest HOG face in an RGB uint8 image.

    The face is found on a copy at most ``detect_side`` pixels wide (HOG on a 1200 px photo
    takes seconds); the landmarks are fitted at full resolution.
    """
    import dlib
    import face_recognition
    import face_recognition_models
    from PIL import Image

    scale = min(1.0, detect_side / max(image.shape[:2]))
    small = np.asarray(Image.fromarray(image).resize(
        (round(image.shape[1] * scale), round(image.shape[0] * scale)), Image.LANCZOS))
    boxes = face_recognition.face_locations(small, model="hog")
    if not boxes:
        raise ValueError("no face found in a base portrait")
    top, right, bottom, left = (round(v / scale) for v in
                                max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3])))
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    shape = predictor(image, dlib.rectangle(left, top, right, bottom))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def with_forehead(landmarks: np.ndarray) -> np.ndarray:
    """Add points above the eyebrows so the morph lines up foreheads and hairlines too."""
    brows = landmarks[17:27]
    up = brows.mean(axis=0) - landmarks[33]          # from the nose base to the brows
    return np.concatenate([landmarks, brows + 0.9 * up])


def eye_similarity(eyes_from: np.ndarray, eyes_to: np.ndarray) -> np.ndarray:
    """The 3x3 similarity (scale, rotation, shift) mapping two eye centres onto two others.

    As complex numbers z -> a z + b, exact for two point pairs.
    """
    p0, p1 = (complex(*point) for point in eyes_from)
    q0, q1 = (complex(*point) for point in eyes_to)
    a = (q1 - q0) / (p1 - p0)
    b = q0 - a * p0
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])


def align_base_face(name: str, image: np.ndarray, landmarks: np.ndarray) -> BaseFace:
    from PIL import Image
    from scipy.ndimage import map_coordinates

    eye_left, eye_right = landmarks[36:42].mean(0), landmarks[42:48].mean(0)
    target = np.array([EYE_LEFT, EYE_RIGHT])
    scale = np.linalg.norm(target[1] - target[0]) / np.linalg.norm(eye_right - eye_left)
    # Shrink with a proper low-pass filter first; the similarity warp then only rotates
    # and shifts (a bilinear warp that also shrinks 3x would alias).
    pil = Image.fromarray(image)
    small = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.LANCZOS)
    factor = np.array([small.width / pil.width, small.height / pil.height])
    points = landmarks * factor
    similarity = eye_similarity(np.array([points[36:42].mean(0), points[42:48].mean(0)]), target)
    # Each output pixel samples the shrunk photo where the inverse similarity puts it
    # (bilinear; beyond the photo's edge the edge pixels repeat).
    ys, xs = np.mgrid[0:PORTRAIT_H, 0:PORTRAIT_W].astype(np.float64)
    inverse = np.linalg.inv(similarity)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    photo = np.asarray(small, dtype=np.float32) / 255.0
    aligned = np.stack([map_coordinates(photo[..., c], [src_y, src_x], order=1, mode="nearest")
                        for c in range(3)], axis=-1)
    aligned_points = points @ similarity[:2, :2].T + similarity[:2, 2]
    return BaseFace(name, aligned.astype(np.float32), with_forehead(aligned_points))


def load_base_faces(faces_dir: str | Path) -> list[BaseFace]:
    """The three base portraits, aligned; needs ``<faces_dir>/{obama.jpg,biden2.jpg,astronaut.png}``."""
    from PIL import Image

    bases = []
    for name, file_name in BASE_PEOPLE:
        path = Path(faces_dir) / file_name
        if not path.is_file():
            raise FileNotFoundError(f"base portrait missing: {path}")
        image = np.asarray(Image.open(path).convert("RGB"))
        bases.append(align_base_face(name, image, detect_landmarks(image)))
    return bases


def _border_points(width: int, height: int, per_side: int = 5) -> np.ndarray:
    """Fixed points along the image border: the triangulation then covers every pixel."""
    xs, ys = np.linspace(0, width - 1, per_side), np.linspace(0, height - 1, per_side)
    points = ([(x, 0) for x in xs] + [(x, height - 1) for x in xs]
              + [(0, y) for y in ys[1:-1]] + [(width - 1, y) for y in ys[1:-1]])
    return np.array(points, dtype=np.float64)


def morph_target(bases: Sequence[BaseFace], params: FaceParams) -> np.ndarray:
    """Target landmarks: the weighted mean of the bases' landmarks, widened by width_scale."""
    target = sum(w * b.landmarks for w, b in zip(params.weights, bases))
    centre_x = target[:68, 0].mean()
    target = target.copy()
    target[:, 0] = centre_x + (target[:, 0] - centre_x) * params.width_scale
    return target


def make_face_image(bases: Sequence[BaseFace], params: FaceParams) -> np.ndarray:
    """The identity's portrait, (PORTRAIT_H, PORTRAIT_W, 3) uint8.

    A piecewise-affine morph (the same map as skimage's PiecewiseAffineTransform, computed
    here with one Delaunay triangulation of the target shared by all bases, which is much
    faster than skimage's loop over triangles):
    each base is warped onto the target landmarks, then the warps are blended with the
    morph weights and tinted.
    """
    from scipy.ndimage import map_coordinates
    from scipy.spatial import Delaunay

    border = _border_points(PORTRAIT_W, PORTRAIT_H)
    target = np.concatenate([morph_target(bases, params), border])
    triangulation = Delaunay(target)
    ys, xs = np.mgrid[0:PORTRAIT_H, 0:PORTRAIT_W]
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    simplex = triangulation.find_simplex(pixels)
    if (simplex < 0).any():
        raise ValueError("morph target does not cover the portrait (landmarks off the image?)")
    affine = triangulation.transform[simplex]
    partial = np.einsum("nij,nj->ni", affine[:, :2], pixels - affine[:, 2])
    barycentric = np.concatenate([partial, 1.0 - partial.sum(1, keepdims=True)], axis=1)
    corners = triangulation.simplices[simplex]

    blended = np.zeros((PORTRAIT_H, PORTRAIT_W, 3), np.float64)
    for weight, base in zip(params.weights, bases):
        if weight < 1e-4:
            continue
        source_points = np.concatenate([base.landmarks, border])
        source = np.einsum("nk,nkd->nd", barycentric, source_points[corners])
        for channel in range(3):
            sampled = map_coordinates(base.image[..., channel], [source[:, 1], source[:, 0]],
                                      order=1, mode="nearest")
            blended[..., channel] += weight * sampled.reshape(PORTRAIT_H, PORTRAIT_W)
    blended *= np.asarray(params.tint_rgb)
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def portrait_mask(target: np.ndarray) -> np.ndarray:
    """Soft alpha (PORTRAIT_H, PORTRAIT_W, 1) cutting head and neck out of the portrait.

    Below the neck the three base photos differ too much (suits, a space suit) to blend,
    so the body is drawn instead (``draw_torso``).
    """
    from PIL import Image, ImageDraw, ImageFilter

    jaw_width = target[16, 0] - target[0, 0]
    centre_x = target[:68, 0].mean()
    brow_y, chin_y = target[17:27, 1].mean(), target[8, 1]
    face_height = chin_y - brow_y
    mask = Image.new("L", (PORTRAIT_W, PORTRAIT_H), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([centre_x - 0.62 * jaw_width, brow_y - 1.05 * face_height,
                  centre_x + 0.62 * jaw_width, chin_y + 0.08 * face_height], fill=255)
    draw.rectangle([centre_x - 0.3 * jaw_width, chin_y - 0.3 * face_height,
                    centre_x + 0.3 * jaw_width, chin_y + 0.18 * jaw_width], fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(3))
    return (np.asarray(mask, dtype=np.float64) / 255.0)[..., None]


def face_centre(target: np.ndarray) -> tuple[float, float]:
    """The face centre of a landmark set: mean x of the 68 points, y halfway from the
    eyebrows to the chin (where a face detector's box is centred)."""
    return float(target[:68, 0].mean()), float((target[17:27, 1].mean() + target[8, 1]) / 2)


@dataclass(frozen=True)
class Portrait:
    """An identity's head cut out of its morphed portrait."""

    image: np.ndarray                 # (h, w, 3) uint8
    alpha: np.ndarray                 # (h, w, 1) float in [0, 1]
    face_centre: tuple[float, float]  # x, y in the portrait's pixels
    chin: tuple[float, float]         # x, y in the portrait's pixels
    jaw_width: float                  # pixels


def make_portrait(bases: Sequence[BaseFace], params: FaceParams) -> Portrait:
    target = morph_target(bases, params)
    return Portrait(make_face_image(bases, params), portrait_mask(target), face_centre(target),
                    (float(target[8, 0]), float(target[8, 1])), float(target[16, 0] - target[0, 0]))


def shrink(portrait: Portrait, factor: float) -> Portrait:
    from PIL import Image

    h, w = portrait.image.shape[:2]
    size = (round(w * factor), round(h * factor))
    image = np.asarray(Image.fromarray(portrait.image).resize(size, Image.LANCZOS))
    alpha = Image.fromarray(portrait.alpha[..., 0].astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    return Portrait(image, np.clip(np.asarray(alpha, dtype=np.float64), 0, 1)[..., None],
                    (portrait.face_centre[0] * factor, portrait.face_centre[1] * factor),
                    (portrait.chin[0] * factor, portrait.chin[1] * factor),
                    portrait.jaw_width * factor)
