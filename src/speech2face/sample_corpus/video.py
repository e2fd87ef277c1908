"""A planned video (``Video``: canvas, motion, soundtrack, where the face is), its CSV
rows, and writing it to a bit-exact H.264/AAC mp4 with ffmpeg (``mux_video``, ``write_video``).
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from speech2face.sample_corpus.scene import FRAME_H, FRAME_W, Motion, face_at, render_frame
from speech2face.sample_corpus.speech import AUDIO_RATE, Soundtrack

FPS = 12
AUDIO_BITRATE = "32k"
VIDEO_CRF = "30"


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


class NoDetectableFace(RuntimeError):
    """A rendered segment's face is not found by the HOG detector at its (x, y)."""


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
                raise NoDetectableFace(f"{self.youtube_id} @ {mid:.2f}s: no HOG face at {xy}")


def write_video(video: Video, path: Path, with_audio: bool = True, faststart: bool = True) -> None:
    mux_video(video.frames(), video.n_frames, video.soundtrack.audio if with_audio else None,
              path, faststart=faststart)
