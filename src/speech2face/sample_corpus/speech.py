"""An identity's speech: espeak-ng voices (variant files in a private data folder),
the sentences each speaker says, and the soundtrack of a video (segments with gaps of
silence or an interviewer's voice).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from speech2face.sample_corpus.identities import VoiceParams

AUDIO_RATE = 16000
ESPEAK_RATE = 22050              # what espeak-ng writes

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
    variant_file = espeak_root / "espeak-ng-data" / "voices" / "!v" / variant
    variant_file.write_text(espeak_variant_text(variant, voice))
    wav = espeak_root / f"{variant}.wav"
    try:
        subprocess.run(["espeak-ng", f"--path={espeak_root}", "-v", f"{language}+{variant}",
                        "-s", str(voice.speed_wpm), "-g", str(voice.word_gap), "-z",
                        "-w", str(wav), "--stdin"],
                       input=text, text=True, check=True, capture_output=True)
    finally:
        # espeak-ng lists at most about 350 voice files: variants left behind made it fail
        # after ~210 identities per worker (a corpus of 600 identities)
        variant_file.unlink(missing_ok=True)
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
