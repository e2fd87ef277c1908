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

(exact formulas in ``identities.face_params`` and ``identities.voice_params``;
data/sample/README.md repeats them). Everything else (background, face position, camera
motion, sentences, gaps) is drawn from separate random streams that carry no information
about the identity.

Every random draw comes from ``np.random.default_rng([seed, index, stream])``, so one
identity's video never depends on another's or on the order in which they are built, and
the files are byte-identical from run to run (ffmpeg and x264 in bit-exact mode).

This module builds the corpus (``generate``: the CSV rows, the identities' videos and the
deliberately bad rows); the parts it is made of live in the sibling modules.
"""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from speech2face.sample_corpus.identities import (STREAM_SCENE, STREAM_SCRIPT, Latent, VoiceParams, face_params,
                                                  identity_latent, identity_rng, voice_params, youtube_id)
from speech2face.sample_corpus.portraits import BaseFace, Portrait, load_base_faces, make_portrait
from speech2face.sample_corpus.scene import build_scene, draw_motion, face_boxes, make_landscape
from speech2face.sample_corpus.speech import (AUDIO_RATE, INTERVIEWER_LINES, INTERVIEWER_VOICE, Segment, Soundtrack,
                                              build_soundtrack, choose_sentences, make_private_espeak, speak)
from speech2face.sample_corpus.video import CsvRow, NoDetectableFace, Video, write_video

DEFAULT_SEED = 20190524          # Speech2Face's arXiv date; any fixed value works
N_IDENTITIES = 90
CLIPS_PER_IDENTITY = 3
# avspeech_sample_test.csv, the sample's stand-in for AVSpeech's test CSV (faces.split_by:
# csv): every fifth identity (index 4, 9, ...), 20 % as the default test fraction. Chosen by
# index, not by the split's hash: test ids picked by the hash would be the ids with the
# largest u, and the rest, cut by the same u, would all fall into train (no validation).
TEST_EVERY = 5


def is_test_identity(index: int) -> bool:
    return index % TEST_EVERY == TEST_EVERY - 1


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


def _run_task(task: tuple[str, int, str, bool]) -> tuple[list[list[str]], IdentityRecord | None]:
    """One identity's video and rows, or one bad row ("identity" or a BAD_KINDS kind). With
    ``strict`` off, an identity whose face the detector misses is dropped (no rows, no video)."""
    kind, index, videos_dir, strict = task
    builder = _WORKER["builder"]
    if kind == "identity":
        try:
            rows, record = build_identity(builder, index, Path(videos_dir))
        except NoDetectableFace:
            if strict:
                raise
            return [], None   # check_faces runs before the video is written: nothing to remove
        return [format_row(r) for r in rows], record
    return build_bad_row(builder, kind, index, Path(videos_dir)), None


def generate(out_dir: str | Path, faces_dir: str | Path, seed: int = DEFAULT_SEED,
             n_identities: int = N_IDENTITIES, workers: int = 2, strict: bool = True) -> dict:
    """Write the whole corpus to ``out_dir``: videos/, avspeech_sample.csv, identities.csv
    (ground-truth latent and voice per identity), transcripts.csv and avspeech_sample_test.csv
    (the rows of the test identities, ``is_test_identity``).

    The videos folder is rebuilt from scratch so no stale video survives. Identities are
    built in parallel; every one draws from its own random streams, so the output does not
    depend on ``workers``. ``strict`` (the embedded sample): every identity's face must be
    detectable, else the run stops; off (a large corpus, where a rare morph defeats the HOG
    detector): such an identity is left out and counted in ``dropped_identities``.
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

    tasks = [("identity", i, str(videos_dir), strict) for i in range(n_identities)]
    tasks += [(kind, BAD_INDEX_BASE + k, str(videos_dir), strict) for k, kind in enumerate(BAD_KINDS)]
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
    write_csv([row for (kind, index, *_), (task_rows, _) in zip(tasks, results)
               if kind == "identity" and is_test_identity(index) for row in task_rows],
              out_dir / "avspeech_sample_test.csv")
    write_identities(records, out_dir / "identities.csv")
    write_transcripts(records, out_dir / "transcripts.csv")
    total_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"identities": len(records), "rows": len(rows),
            "dropped_identities": sum(1 for (kind, *_), (task_rows, _) in zip(tasks, results)
                                      if kind == "identity" and not task_rows),
            "bad_rows": sum(len(r) for r, rec in results if rec is None),
            "total_bytes": total_bytes}
