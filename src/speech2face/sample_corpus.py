"""The embedded sample corpus: a small synthetic stand-in for AVSpeech (data/sample/).

Each identity is one "YouTube video" of a talking head: a face made by morphing three real
public-domain portraits (Obama, Biden, Eileen Collins) and a voice made with espeak-ng.
Face and voice are both deterministic functions of a per-identity latent, so a model can
learn to predict an unseen speaker's face from the voice better than chance:

    latent = (w_obama, w_biden, w_collins) ~ Dirichlet(1, 1, 1),  width ~ U(0.88, 1.12),
             tint ~ U(-1, 1)
    face   = landmark morph of the three portraits with weights w, face x-coordinates
             scaled by width about the face centre, RGB multiplied by the tint factors
    voice  = pitch from w_collins, formant scale from w_collins / width (vocal tract
             length), speaking rate from w_obama - w_biden, pause between words from tint

(exact formulas in ``face_params`` and ``voice_params``; data/sample/README.md repeats
them). Everything else (background, face position, camera motion, sentences, gaps) is
drawn from separate random streams that carry no information about the identity.

Every random draw comes from ``np.random.default_rng([seed, index, stream])``, so one
identity's video never depends on another's or on the order in which they are built, and
the files are byte-identical from run to run (ffmpeg and x264 in bit-exact mode).
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

DEFAULT_SEED = 20190524          # Speech2Face's arXiv date; any fixed value works
N_IDENTITIES = 90
CLIPS_PER_IDENTITY = 3

FRAME_W, FRAME_H = 320, 240      # 4:3, so x and y fractions differ (catches swapped axes)
FPS = 12
CANVAS_MARGIN = 16               # the static scene is this much larger on every side
AUDIO_RATE = 16000
ESPEAK_RATE = 22050              # what espeak-ng writes
AUDIO_BITRATE = "32k"
VIDEO_CRF = "30"

# The morphed portrait (head and neck are cut out of it).
PORTRAIT_W, PORTRAIT_H = 192, 240
# Eye centres in the portrait: an inter-ocular distance of 40 px gives HOG face boxes of
# ~100 px (HOG needs ~80 px at upsample 0, ~40 px at upsample 1).
EYE_LEFT = (PORTRAIT_W / 2 - 20.0, 100.0)
EYE_RIGHT = (PORTRAIT_W / 2 + 20.0, 100.0)

# (person, file in the shared media folder). The two extra photos of Obama and Biden are
# left out: a base "person" must be one photo so the morph weights mean one face each.
BASE_PEOPLE = (("obama", "obama.jpg"), ("biden", "biden2.jpg"), ("collins", "astronaut.png"))

WIDTH_RANGE = (0.88, 1.12)

# Random streams (the third element of the rng seed).
STREAM_LATENT, STREAM_ID, STREAM_SCRIPT, STREAM_SCENE = 0, 1, 2, 3

# YouTube ids are 11 characters of base64url; the 11th carries only 4 bits, so it is one of
# these 16 characters.
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ID_LAST_CHAR = "AEIMQUYcgkosw048"

# Segment lengths (seconds of speech) per clip: one short, one medium, one long, so some
# clips are shorter than the 6 s the spectrogram needs (it repeats them) and some longer.
TARGET_SECONDS = ((2.0, 3.5), (4.0, 5.5), (6.0, 7.5))
SEGMENT_PAD = 0.15               # silence kept either side of the speech in a segment

# Written for this corpus (no third-party text). 6 to 28 words, so that every speaking
# rate finds sentences for every target length.
SENTENCES = (
    "The kettle is already on the stove.",
    "Please close the window before you leave.",
    "We walked home along the river.",
    "My sister plays the violin every evening.",
    "The train was late again this morning.",
    "Nobody knew where the old key was.",
    "Bright lights were shining over the harbour.",
    "He painted the fence a pale green.",
    "The garden needs rain after this dry week.",
    "I found a silver coin under the sofa.",
    "Our neighbours bought a small red boat last year.",
    "The library opens at nine on Sunday mornings.",
    "She wrote the whole letter by candlelight.",
    "Fresh bread smells wonderful early in the morning.",
    "The children built a tall tower of wooden blocks.",
    "A cold wind came down from the hills after sunset.",
    "When the storm finally passed, we went outside to count the fallen branches.",
    "The museum keeps a collection of old maps that show forgotten rivers.",
    "I usually take the bus to work, but today I rode my bicycle.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "After dinner we played cards by the fire until everyone was too tired to think.",
    "The new bridge will connect the two villages and shorten the trip by an hour.",
    "He spent the whole afternoon fixing the radio that his grandfather had left him.",
    "Most of the birds leave the island in autumn and come back in the spring.",
    "The teacher asked us to read three chapters and write a short summary of each.",
    "Our flight was delayed, so we explored the airport and tried every kind of coffee.",
    "The farmer says this year's apples are the sweetest he has grown in a decade.",
    "Walking through the market, she stopped to listen to a man playing the accordion.",
    "The old lighthouse still works, although no ship has needed it for many years.",
    "If the weather stays clear tonight, we should be able to see the comet.",
    "They carried the piano up three flights of stairs without scratching a single step.",
    "Every summer the town holds a festival with music, food, and fireworks by the lake.",
    "The committee met for several hours to discuss the budget, and in the end they agreed "
    "to repair the school roof.",
    "When I was young, my family spent every holiday in a small cottage by the sea, where "
    "the only sound at night was the waves.",
    "Scientists have measured the glacier for forty years, and their records show that it "
    "has retreated more than a kilometre.",
    "The bakery on the corner opens before dawn, and by seven there is usually a long line "
    "of people waiting outside.",
    "Although the map suggested a short walk, the path wound through the forest for miles "
    "before it finally reached the top of the hill.",
    "She learned to speak three languages while working abroad, and now she translates "
    "novels for a publisher in the city.",
    "The engineers tested the new engine in the desert, where the heat and the dust pushed "
    "every part of the machine to its limit.",
    "Our neighbour keeps bees in the garden behind his house, and every autumn he gives each "
    "family on the street a jar of honey.",
    "The orchestra rehearsed the symphony for weeks, yet on the night of the concert the "
    "conductor still found something new in the music.",
    "After the long drive through the mountains, we arrived at the village just as the "
    "church bells were ringing for evening.",
    "The report recommends planting more trees along the main road, because they give shade "
    "in summer and reduce the noise from traffic.",
    "He collected stamps from every country he visited, and his albums now fill two shelves "
    "in the study next to the window.",
    "The rescue team searched the valley through the night, guided by the lights of a "
    "helicopter circling slowly above the trees.",
    "Every morning the fishermen check the weather report, mend their nets, and decide "
    "together whether the sea is calm enough to go out.",
    "The small museum in the harbour tells the story of the ships that were built there, "
    "from wooden sailing boats to the modern ferries of today.",
    "Before the invention of the printing press, books were copied by hand, and a single "
    "volume could take a patient scribe more than a whole year to finish.",
)

# Another person's voice in some of the gaps between segments: a segment that spills over
# its boundaries picks up speech that is not the speaker's.
INTERVIEWER_LINES = (
    "I see.",
    "Go on, please.",
    "Right, and then what happened?",
    "Interesting.",
    "Tell me more about that.",
    "And how did that feel?",
)


# --------------------------------------------------------------------------- latent


@dataclass(frozen=True)
class Latent:
    """What makes an identity: morph weights over the base people, face width, skin tint."""

    weights: tuple[float, float, float]   # (obama, biden, collins), sum 1
    width: float                          # face width factor, WIDTH_RANGE
    tint: float                           # -1 (lighter, cooler) .. 1 (darker, warmer)

    @property
    def w_obama(self) -> float:
        return self.weights[0]

    @property
    def w_biden(self) -> float:
        return self.weights[1]

    @property
    def w_collins(self) -> float:
        return self.weights[2]


def identity_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def identity_latent(seed: int, index: int) -> Latent:
    rng = identity_rng(seed, index, STREAM_LATENT)
    weights = rng.dirichlet([1.0, 1.0, 1.0])
    width = rng.uniform(*WIDTH_RANGE)
    tint = rng.uniform(-1.0, 1.0)
    return Latent(tuple(round(float(w), 6) for w in weights), round(float(width), 6),
                  round(float(tint), 6))


def youtube_id(seed: int, index: int) -> str:
    """11 characters like a real YouTube id; never starts with '-' (reads as an option)."""
    rng = identity_rng(seed, index, STREAM_ID)
    first = ID_ALPHABET[:-2][rng.integers(62)]
    middle = "".join(ID_ALPHABET[i] for i in rng.integers(64, size=9))
    return first + middle + ID_LAST_CHAR[rng.integers(16)]


@dataclass(frozen=True)
class FaceParams:
    weights: tuple[float, float, float]   # morph weights over BASE_PEOPLE
    width_scale: float                    # x-coordinates of the landmarks scaled about the centre
    tint_rgb: tuple[float, float, float]  # multiplies R, G, B


def face_params(latent: Latent) -> FaceParams:
    t = latent.tint
    return FaceParams(
        weights=latent.weights,
        width_scale=latent.width,
        # Blue darkens most, red least: t > 0 is a darker, warmer skin, t < 0 paler, cooler.
        tint_rgb=(1.0 - 0.10 * t, 1.0 - 0.18 * t, 1.0 - 0.26 * t),
    )


@dataclass(frozen=True)
class VoiceParams:
    gender: str            # espeak variant's gender line (female when w_collins > 0.5)
    pitch_base_hz: int     # espeak variant "pitch <base> <top>"
    pitch_top_hz: int
    formant_percent: int   # espeak variant "formant k <percent> 100 100" for k = 0..5
    speed_wpm: int         # espeak-ng -s
    word_gap: int          # espeak-ng -g, units of 10 ms


def voice_params(latent: Latent) -> VoiceParams:
    """The voice<->face function. Each face coordinate drives something audible:

    - w_collins (the woman) raises the pitch (85 .. 185 Hz base) and the formants;
    - width (a wider face, a longer vocal tract) lowers the formants;
    - w_obama - w_biden sets the speaking rate (Biden's side slow, Obama's side fast);
    - tint sets the pause between words.
    """
    w_o, w_b, w_c = latent.weights
    base = 85.0 + 100.0 * w_c
    return VoiceParams(
        gender="female" if w_c > 0.5 else "male",
        pitch_base_hz=round(base),
        pitch_top_hz=round(1.45 * base),
        formant_percent=round(100.0 * (1.0 + 0.12 * w_c) / latent.width),
        speed_wpm=round(160.0 + 40.0 * (w_o - w_b)),
        word_gap=round(1.5 * (latent.tint + 1.0)),
    )


INTERVIEWER_VOICE = VoiceParams(gender="male", pitch_base_hz=130, pitch_top_hz=170,
                                formant_percent=104, speed_wpm=175, word_gap=0)


def espeak_variant_text(name: str, voice: VoiceParams) -> str:
    """An espeak-ng voice variant file (voices/!v/<name>) for these parameters."""
    lines = [
        "language variant",
        f"name {name}",
        f"gender {voice.gender}",
        f"pitch {voice.pitch_base_hz} {voice.pitch_top_hz}",
    ]
    lines += [f"formant {k} {voice.formant_percent} 100 100" for k in range(6)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- faces


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


# --------------------------------------------------------------------------- scene


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


# --------------------------------------------------------------------------- speech


def espeak_data_dir() -> Path:
    """The installed espeak-ng-data folder (``espeak-ng --version`` names it)."""
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Data at:\s*(\S+)", out)
    if not match or not Path(match.group(1)).is_dir():
        raise RuntimeError(f"cannot find espeak-ng-data from: {out.strip()}")
    return Path(match.group(1))


def make_private_espeak(root: Path) -> Path:
    """Make ``root``/espeak-ng-data: a private espeak-ng data folder whose voices/!v/ holds
    our own voice variants; returns ``root`` (pass it as ``--path``).

    espeak-ng reads variants only from its data folder (``-v en+/some/path`` silently falls
    back to the default voice), so the system folder is mirrored with symlinks and the
    variant folder replaced by an empty one that ``speak`` fills.
    """
    system = espeak_data_dir()
    data = root / "espeak-ng-data"
    (data / "voices" / "!v").mkdir(parents=True)
    for entry in system.iterdir():
        if entry.name != "voices":
            (data / entry.name).symlink_to(entry)
    for entry in (system / "voices").iterdir():
        if entry.name != "!v":
            (data / "voices" / entry.name).symlink_to(entry)
    return root


@contextlib.contextmanager
def private_espeak() -> Iterator[Path]:
    """``make_private_espeak`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="s2f-espeak-") as tmp:
        yield make_private_espeak(Path(tmp))


def speak(text: str, voice: VoiceParams, espeak_root: Path, variant: str,
          language: str = "en-us") -> np.ndarray:
    """espeak-ng speech for ``text`` as float32 mono at AUDIO_RATE, peak 0.7."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if not re.fullmatch(r"[a-z0-9_]{1,32}", variant):
        raise ValueError(f"bad variant name {variant!r}")
    (espeak_root / "espeak-ng-data" / "voices" / "!v" / variant).write_text(
        espeak_variant_text(variant, voice))
    wav = espeak_root / f"{variant}.wav"
    subprocess.run(["espeak-ng", f"--path={espeak_root}", "-v", f"{language}+{variant}",
                    "-s", str(voice.speed_wpm), "-g", str(voice.word_gap), "-z",
                    "-w", str(wav), "--stdin"],
                   input=text, text=True, check=True, capture_output=True)
    rate, samples = wavfile.read(wav)
    wav.unlink()
    if rate != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    audio = resample_poly(samples.astype(np.float64), AUDIO_RATE, ESPEAK_RATE)
    peak = np.abs(audio).max()
    return (0.7 * audio / peak).astype(np.float32) if peak > 0 else audio.astype(np.float32)


def speech_bounds(audio: np.ndarray, threshold: float = 0.02) -> tuple[int, int]:
    """First and one-past-last sample louder than ``threshold`` (of full scale)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if len(loud) == 0:
        raise ValueError("no speech in the synthesised audio")
    return int(loud[0]), int(loud[-1]) + 1


def estimated_seconds(sentence: str, voice: VoiceParams) -> float:
    """espeak-ng's duration, roughly (measured: ~0.31 s per word at 160 wpm)."""
    words = len(sentence.split())
    return words * (0.31 * 160.0 / voice.speed_wpm + 0.01 * voice.word_gap)


def choose_sentences(rng: np.random.Generator, voice: VoiceParams) -> list[str]:
    """One sentence per TARGET_SECONDS range, all different, in a random order."""
    chosen: list[str] = []
    for low, high in TARGET_SECONDS:
        target = rng.uniform(low, high)
        candidates = [s for s in SENTENCES if s not in chosen]
        errors = np.array([abs(estimated_seconds(s, voice) - target) for s in candidates])
        # Among the three closest, pick one at random: speakers with the same rate do not
        # all say the same thing.
        closest = np.argsort(errors, kind="stable")[:3]
        chosen.append(candidates[int(rng.choice(closest))])
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


# --------------------------------------------------------------------------- one video


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    sentence: str


@dataclass
class Soundtrack:
    audio: np.ndarray             # float32 at AUDIO_RATE
    segments: list[Segment]


def build_soundtrack(rng: np.random.Generator, utterances: Sequence[tuple[str, np.ndarray]],
                     interviewer: Sequence[np.ndarray]) -> Soundtrack:
    """Lead-in, then each utterance as a segment, with gaps of silence or another voice.

    Segment boundaries are in milliseconds; each segment holds its speech plus SEGMENT_PAD.
    """
    pieces: list[np.ndarray] = []
    segments: list[Segment] = []
    cursor = 0

    def silence(seconds: float) -> None:
        nonlocal cursor
        n = int(round(seconds * AUDIO_RATE))
        pieces.append(np.zeros(n, np.float32))
        cursor += n

    silence(rng.uniform(0.4, 1.0))
    for i, (sentence, audio) in enumerate(utterances):
        if i > 0:
            # The gap between two segments: silence, or a short line of the interviewer
            # with at least 0.3 s of silence either side.
            if rng.random() < 0.5:
                line = interviewer[int(rng.integers(len(interviewer)))]
                lo, hi = speech_bounds(line)
                silence(rng.uniform(0.3, 0.5))
                pieces.append(line[lo:hi])
                cursor += hi - lo
                silence(rng.uniform(0.3, 0.5))
            else:
                silence(rng.uniform(0.8, 1.6))
        lo, hi = speech_bounds(audio)
        start_ms = round(cursor / AUDIO_RATE * 1000)
        silence(SEGMENT_PAD)
        pieces.append(audio[lo:hi])
        cursor += hi - lo
        silence(SEGMENT_PAD)
        end_ms = round(cursor / AUDIO_RATE * 1000)
        segments.append(Segment(start_ms / 1000, end_ms / 1000, sentence))
    silence(rng.uniform(0.4, 0.8))
    track = np.concatenate(pieces)
    # A faint, fixed room tone, so silence is not digital zero.
    track = track + rng.normal(0.0, 0.002, len(track)).astype(np.float32)
    return Soundtrack(track.astype(np.float32), segments)


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def mux_video(frames: Iterator[np.ndarray], n_frames: int, audio: np.ndarray | None,
              path: str | Path, faststart: bool = True) -> None:
    """Encode RGB frames (FRAME_H x FRAME_W) and mono audio to H.264/AAC mp4, bit-exact.

    Deterministic output: x264 on one thread, ffmpeg's bitexact flags (no version strings
    or timestamps in the container), no metadata copied.
    """
    from scipy.io import wavfile

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="s2f-mux-") as tmp:
        command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{FRAME_W}x{FRAME_H}",
                   "-r", str(FPS), "-i", "pipe:0"]
        if audio is not None:
            wav = Path(tmp) / "audio.wav"
            wavfile.write(wav, AUDIO_RATE, to_int16(audio))
            command += ["-i", str(wav)]
        command += ["-map", "0:v:0"]
        if audio is not None:
            command += ["-map", "1:a:0", "-c:a", "aac", "-b:a", AUDIO_BITRATE,
                        "-ar", str(AUDIO_RATE), "-ac", "1", "-flags:a", "+bitexact"]
        command += ["-c:v", "libx264", "-preset", "slow", "-crf", VIDEO_CRF, "-threads", "1",
                    "-pix_fmt", "yuv420p", "-g", str(FPS * 4), "-flags:v", "+bitexact",
                    "-fflags", "+bitexact", "-map_metadata", "-1", "-map_chapters", "-1"]
        if faststart:
            command += ["-movflags", "+faststart"]
        command += ["-f", "mp4", str(path)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        written = 0
        try:
            for frame in frames:
                process.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                written += 1
            process.stdin.close()
        except BrokenPipeError:
            pass
        stderr = process.stderr.read().decode("utf-8", "replace")
        if process.wait() != 0 or written != n_frames:
            raise RuntimeError(f"ffmpeg failed on {path.name}: {stderr.strip()[-300:]}")


@dataclass(frozen=True)
class CsvRow:
    youtube_id: str
    start: float
    end: float
    x: float
    y: float


@dataclass
class Video:
    """A planned video: its canvas, motion, soundtrack and where the face is on the canvas."""

    youtube_id: str
    canvas: np.ndarray                        # (CANVAS_H, CANVAS_W, 3) float in [0, 1]
    face_canvas_xy: tuple[float, float] | None
    soundtrack: Soundtrack
    motion: Motion

    @property
    def n_frames(self) -> int:
        return int(math.ceil(len(self.soundtrack.audio) / AUDIO_RATE * FPS))

    @property
    def duration(self) -> float:
        return self.n_frames / FPS

    def canvas_image(self):
        from PIL import Image

        return Image.fromarray(np.round(self.canvas * 255).astype(np.uint8))

    def frames(self) -> Iterator[np.ndarray]:
        image = self.canvas_image()
        for i in range(self.n_frames):
            yield render_frame(image, self.motion, i / FPS)

    def frame_at(self, t: float) -> np.ndarray:
        """The frame shown at time t (frame i covers [i/FPS, (i+1)/FPS))."""
        i = min(int(t * FPS), self.n_frames - 1)
        return render_frame(self.canvas_image(), self.motion, i / FPS)

    def rows(self) -> list[CsvRow]:
        """One CSV row per segment; x, y = the face centre in the frame at mid-segment.

        Pixel (i, j) spans [i, i+1) x [j, j+1), so a face centred on pixel index i has
        x = (i + 0.5) / FRAME_W (the convention the faces stage reads back).
        """
        rows = []
        for seg in self.soundtrack.segments:
            mid = min(int((seg.start + seg.end) / 2 * FPS), self.n_frames - 1) / FPS
            if self.face_canvas_xy is None:
                x, y = FRAME_W / 2, FRAME_H / 2
            else:
                x, y = self.motion.to_frame(mid, (self.face_canvas_xy[0] + 0.5,
                                                  self.face_canvas_xy[1] + 0.5))
            rows.append(CsvRow(self.youtube_id, seg.start, seg.end, round(x / FRAME_W, 6),
                               round(y / FRAME_H, 6)))
        return rows

    def check_faces(self) -> None:
        """HOG must find the face at each row's (x, y) in the frame at mid-segment."""
        for row in self.rows():
            mid = (row.start + row.end) / 2
            xy = (row.x * FRAME_W - 0.5, row.y * FRAME_H - 0.5)
            if face_at(self.frame_at(mid), xy) is None:
                raise RuntimeError(f"{self.youtube_id} @ {mid:.2f}s: no HOG face at {xy}")


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


# --------------------------------------------------------------------------- CSV


def format_row(row: CsvRow) -> list[str]:
    return [row.youtube_id, f"{row.start:.6f}", f"{row.end:.6f}", f"{row.x:.6f}", f"{row.y:.6f}"]


def write_csv(rows: Sequence[Sequence[str]], path: str | Path) -> None:
    """AVSpeech format: no header, youtube_id,start,end,x,y; fields quoted only when needed
    (a hostile id with a comma or quote stays one field). LF line endings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for row in rows:
            writer.writerow(row)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class IdentityRecord:
    """Ground truth for one identity (written to identities.csv)."""

    index: int
    youtube_id: str
    latent: Latent
    voice: VoiceParams
    segments: tuple[Segment, ...]


def has_distractor(index: int) -> bool:
    return index % 15 == 7      # 6 of 90 identities


class CorpusBuilder:
    """Builds the videos of one corpus; holds the base faces and the private espeak folder."""

    def __init__(self, seed: int, bases: Sequence[BaseFace], espeak_root: Path):
        self.seed = seed
        self.bases = list(bases)
        self.espeak_root = espeak_root
        self._interviewer: list[np.ndarray] | None = None

    def interviewer_lines(self) -> list[np.ndarray]:
        if self._interviewer is None:
            self._interviewer = [speak(line, INTERVIEWER_VOICE, self.espeak_root, "interviewer",
                                       language="en-gb") for line in INTERVIEWER_LINES]
        return self._interviewer

    def portrait(self, index: int) -> Portrait:
        return make_portrait(self.bases, face_params(identity_latent(self.seed, index)))

    def soundtrack(self, index: int, n_utterances: int = CLIPS_PER_IDENTITY) -> Soundtrack:
        voice = voice_params(identity_latent(self.seed, index))
        rng = identity_rng(self.seed, index, STREAM_SCRIPT)
        sentences = choose_sentences(rng, voice)[:n_utterances]
        variant = f"speaker{index:03d}"
        utterances = [(s, speak(s, voice, self.espeak_root, variant)) for s in sentences]
        return build_soundtrack(rng, utterances, self.interviewer_lines())

    def talking_head(self, index: int, n_utterances: int = CLIPS_PER_IDENTITY,
                     distractor_index: int | None = None) -> Video:
        scene_rng = identity_rng(self.seed, index, STREAM_SCENE)
        distractor = self.portrait(distractor_index) if distractor_index is not None else None
        canvas, face_xy = build_scene(scene_rng, self.portrait(index), distractor)
        soundtrack = self.soundtrack(index, n_utterances)
        motion = draw_motion(scene_rng, len(soundtrack.audio) / AUDIO_RATE)
        return Video(youtube_id(self.seed, index), canvas, face_xy, soundtrack, motion)

    def identity_video(self, index: int) -> Video:
        """Identity ``index``'s video as the corpus has it (distractor included)."""
        distractor = (index + N_IDENTITIES // 2) % N_IDENTITIES if has_distractor(index) else None
        return self.talking_head(index, distractor_index=distractor)

    def landscape(self, index: int) -> Video:
        """A video with speech but no face (a bad row)."""
        scene_rng = identity_rng(self.seed, index, STREAM_SCENE)
        canvas = make_landscape(scene_rng)
        if face_boxes(np.round(canvas * 255).astype(np.uint8)):
            raise RuntimeError("HOG finds a face in the landscape")
        soundtrack = self.soundtrack(index, 1)
        motion = draw_motion(scene_rng, len(soundtrack.audio) / AUDIO_RATE)
        return Video(youtube_id(self.seed, index), canvas, None, soundtrack, motion)


def write_video(video: Video, path: Path, with_audio: bool = True, faststart: bool = True) -> None:
    mux_video(video.frames(), video.n_frames, video.soundtrack.audio if with_audio else None,
              path, faststart=faststart)


# Bad rows: (kind, what the pipeline should record). The README documents each.
BAD_KINDS = ("missing_video", "no_face", "no_audio", "truncated_file", "segment_out_of_range",
             "malformed_row", "hostile_path_id", "hostile_shell_id")
BAD_INDEX_BASE = 1000      # identity index (random streams) of the first bad row's video
HOSTILE_PATH_ID = "../../etc/passwd"
HOSTILE_SHELL_ID = '$(touch pwned);echo "x",y'      # a comma and quotes: csv must quote it


def build_identity(builder: CorpusBuilder, index: int, videos_dir: Path) -> tuple[list[CsvRow], IdentityRecord]:
    video = builder.identity_video(index)
    video.check_faces()
    write_video(video, videos_dir / f"{video.youtube_id}.mp4")
    latent = identity_latent(builder.seed, index)
    return video.rows(), IdentityRecord(index, video.youtube_id, latent, voice_params(latent),
                                        tuple(video.soundtrack.segments))


def build_bad_row(builder: CorpusBuilder, kind: str, index: int, videos_dir: Path) -> list[list[str]]:
    """One deliberately bad CSV row (its own youtube_id) and the video it points to, if any."""
    vid = youtube_id(builder.seed, index)
    if kind == "missing_video":         # an id with no file behind it
        return [format_row(CsvRow(vid, 1.0, 4.0, 0.5, 0.5))]
    if kind == "no_face":               # speech over a landscape: no face anywhere
        landscape = builder.landscape(index)
        write_video(landscape, videos_dir / f"{vid}.mp4")
        return [format_row(r) for r in landscape.rows()]
    if kind == "no_audio":              # a talking head without an audio stream
        silent = builder.talking_head(index, n_utterances=1)
        write_video(silent, videos_dir / f"{vid}.mp4", with_audio=False)
        return [format_row(r) for r in silent.rows()]
    if kind == "truncated_file":        # cut in half: the moov atom (written last) is gone
        cut = builder.talking_head(index, n_utterances=1)
        path = videos_dir / f"{vid}.mp4"
        write_video(cut, path, faststart=False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return [format_row(r) for r in cut.rows()]
    if kind == "segment_out_of_range":  # a good video; the segment starts after its end
        late = builder.talking_head(index, n_utterances=1)
        write_video(late, videos_dir / f"{vid}.mp4")
        row = late.rows()[0]
        start = math.ceil(late.duration) + 20.0
        return [format_row(CsvRow(vid, start, start + 3.0, row.x, row.y))]
    if kind == "malformed_row":         # four fields instead of five
        return [[vid, "1.000000", "4.000000", "0.500000"]]
    if kind == "hostile_path_id":       # must never become a path
        return [[HOSTILE_PATH_ID, "1.000000", "4.000000", "0.500000", "0.500000"]]
    if kind == "hostile_shell_id":      # must never reach a shell
        return [[HOSTILE_SHELL_ID, "1.000000", "4.000000", "0.500000", "0.500000"]]
    raise ValueError(f"unknown bad row kind {kind!r}")


def write_identities(records: Sequence[IdentityRecord], path: Path) -> None:
    header = ["index", "youtube_id", "w_obama", "w_biden", "w_collins", "width", "tint",
              "gender", "pitch_base_hz", "pitch_top_hz", "formant_percent", "speed_wpm", "word_gap"]
    rows = [header]
    for r in records:
        v = asdict(r.voice)
        rows.append([str(r.index), r.youtube_id, *(f"{w:.6f}" for w in r.latent.weights),
                     f"{r.latent.width:.6f}", f"{r.latent.tint:.6f}",
                     *(str(v[k]) for k in header[7:])])
    write_csv(rows, path)


def write_transcripts(records: Sequence[IdentityRecord], path: Path) -> None:
    """What is said in each good segment (one row per CSV row of the identities)."""
    rows = [["youtube_id", "start", "end", "text"]]
    for r in records:
        rows += [[r.youtube_id, f"{s.start:.6f}", f"{s.end:.6f}", s.sentence] for s in r.segments]
    write_csv(rows, path)


# Per-process state of the generator's workers (set by _start_worker).
_WORKER: dict = {}


def _start_worker(seed: int, bases: Sequence[BaseFace], scratch: str) -> None:
    espeak_root = Path(tempfile.mkdtemp(prefix="espeak-", dir=scratch))
    make_private_espeak(espeak_root)
    _WORKER["builder"] = CorpusBuilder(seed, bases, espeak_root)


def _run_task(task: tuple[str, int, str]) -> tuple[list[list[str]], IdentityRecord | None]:
    """One identity's video and rows, or one bad row ("identity" or a BAD_KINDS kind)."""
    kind, index, videos_dir = task
    builder = _WORKER["builder"]
    if kind == "identity":
        rows, record = build_identity(builder, index, Path(videos_dir))
        return [format_row(r) for r in rows], record
    return build_bad_row(builder, kind, index, Path(videos_dir)), None


def generate(out_dir: str | Path, faces_dir: str | Path, seed: int = DEFAULT_SEED,
             n_identities: int = N_IDENTITIES, workers: int = 2) -> dict:
    """Write the whole corpus to ``out_dir``: videos/, avspeech_sample.csv, identities.csv
    (ground-truth latent and voice per identity) and transcripts.csv.

    The videos folder is rebuilt from scratch so no stale video survives. Identities are
    built in parallel; every one draws from its own random streams, so the output does not
    depend on ``workers``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    if videos_dir.exists():
        shutil.rmtree(videos_dir)
    videos_dir.mkdir(parents=True)
    ids = [youtube_id(seed, i) for i in range(n_identities)]
    ids += [youtube_id(seed, BAD_INDEX_BASE + k) for k in range(len(BAD_KINDS))]
    if len(set(ids)) != len(ids):
        raise RuntimeError("youtube id collision; change the seed")

    tasks = [("identity", i, str(videos_dir)) for i in range(n_identities)]
    tasks += [(kind, BAD_INDEX_BASE + k, str(videos_dir)) for k, kind in enumerate(BAD_KINDS)]
    bases = load_base_faces(faces_dir)
    with tempfile.TemporaryDirectory(prefix="s2f-sample-") as scratch:
        if workers > 1:
            # fork: the workers inherit the aligned base faces instead of re-detecting them.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=(seed, bases, scratch)) as pool:
                results = list(pool.map(_run_task, tasks))
        else:
            _start_worker(seed, bases, scratch)
            results = [_run_task(task) for task in tasks]
    rows = [row for task_rows, _ in results for row in task_rows]
    records = [record for _, record in results if record is not None]
    write_csv(rows, out_dir / "avspeech_sample.csv")
    write_identities(records, out_dir / "identities.csv")
    write_transcripts(records, out_dir / "transcripts.csv")
    total_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"identities": len(records), "rows": len(rows),
            "bad_rows": sum(len(r) for r, rec in results if rec is None),
            "total_bytes": total_bytes}
