"""ffmpeg/ffprobe through ffmpeg-python: probing clips and decoding audio + frames.

Any container and codec that ffmpeg reads works (FLV/VP6/MP3 included). Every failure
comes back as a ``MediaError`` with a short reason for the manifest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np


class MediaError(Exception):
    """A clip could not be used; ``reason`` is a short manifest code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProbeInfo:
    duration: float
    video_duration: float
    has_audio: bool
    has_video: bool
    width: int
    height: int


def _ffmpeg_message(error: ffmpeg.Error) -> str:
    lines = (error.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else "ffmpeg failed"


def probe(path: str | Path) -> ProbeInfo:
    try:
        info = ffmpeg.probe(str(path))
    except ffmpeg.Error as error:
        raise MediaError("undecodable", _ffmpeg_message(error)) from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = info.get("format", {}).get("duration")
    if duration is None:
        durations = [float(s["duration"]) for s in streams if s.get("duration")]
        duration = max(durations) if durations else 0.0
    # The video stream often ends a little before the container (audio runs on): frames are
    # spread over the video stream's own duration when it has one.
    video_duration = float(video["duration"]) if video and video.get("duration") else float(duration)
    return ProbeInfo(
        duration=float(duration),
        video_duration=min(video_duration, float(duration)) if float(duration) > 0 else video_duration,
        has_audio=audio is not None,
        has_video=video is not None,
        width=int(video.get("width", 0)) if video else 0,
        height=int(video.get("height", 0)) if video else 0,
    )


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Fit inside max_side keeping aspect; even sizes (what most pixel formats need)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def decode_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Mono int16 at ``sample_rate`` from the first audio stream of any file ffmpeg reads."""
    try:
        out, _ = (
            ffmpeg.input(str(path))
            .output("pipe:", map="0:a:0", ac=1, ar=sample_rate, format="s16le", acodec="pcm_s16le")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as error:
        raise MediaError("undecodable_audio", _ffmpeg_message(error)) from None
    return np.frombuffer(out, dtype=np.int16)


def decode_clip(path: str | Path, n_frames: int, sample_rate: int = 16000,
                max_side: int = 640) -> tuple[np.ndarray, list[np.ndarray], ProbeInfo]:
    """Audio (mono int16) and ``n_frames`` RGB frames evenly spaced through the clip.

    One ffmpeg process decodes the file once: audio goes to a temp file, the selected frames
    go to stdout as raw RGB.
    """
    info = probe(path)
    if not info.has_video:
        raise MediaError("no_video")
    if not info.has_audio:
        raise MediaError("no_audio")
    if info.video_duration <= 0:
        raise MediaError("undecodable", "zero duration")
    width, height = scaled_size(info.width, info.height, max_side)
    # Pick the first frame at or after each target time (middles of n equal slices): a
    # select expression is exact where an fps filter drops the last frame on short clips.
    slice_seconds = info.video_duration / n_frames
    targets = [(k + 0.5) * slice_seconds for k in range(n_frames)]
    terms = [f"gte(t,{targets[0]:.4f})*isnan(prev_selected_t)"]
    terms += [f"gte(t,{t:.4f})*lt(prev_selected_t,{t:.4f})" for t in targets[1:]]
    with tempfile.TemporaryDirectory(prefix="s2f-extract-") as tmp:
        audio_path = Path(tmp) / "audio.raw"
        source = ffmpeg.input(str(path))
        audio_out = source["a:0"].output(str(audio_path), ac=1, ar=sample_rate, format="s16le",
                                          acodec="pcm_s16le")
        video = source["v:0"].filter("select", "+".join(terms)).filter("scale", width, height)
        video_out = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=n_frames,
                                 fps_mode="passthrough")
        try:
            raw, _ = ffmpeg.merge_outputs(audio_out, video_out).run(
                capture_stdout=True, capture_stderr=True, overwrite_output=True)
        except ffmpeg.Error as error:
            raise MediaError("undecodable", _ffmpeg_message(error)) from None
        audio = np.fromfile(audio_path, dtype=np.int16) if audio_path.exists() else np.zeros(0, np.int16)
    frame_bytes = width * height * 3
    count = len(raw) // frame_bytes
    frames = [np.frombuffer(raw, np.uint8, frame_bytes, i * frame_bytes).reshape(height, width, 3)
              for i in range(count)]
    if not frames:
        raise MediaError("no_frames", "video stream decoded to no frames")
    if len(audio) == 0:
        raise MediaError("empty_audio")
    return audio, frames, info
