"""Who an identity is: its random streams (``identity_rng``), its latent, its YouTube-like id,
and the face and voice parameters that are deterministic functions of the latent
(``face_params``, ``voice_params``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WIDTH_RANGE = (0.88, 1.12)

# Random streams (the third element of the rng seed).
STREAM_LATENT, STREAM_ID, STREAM_SCRIPT, STREAM_SCENE = 0, 1, 2, 3

# YouTube ids are 11 characters of base64url; the 11th carries only 4 bits, so it is one of
# these 16 characters.
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ID_LAST_CHAR = "AEIMQUYcgkosw048"


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
