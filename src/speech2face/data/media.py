"""FFmpeg: probing clips and decoding audio + frames.

- ``decode_clip`` (the extract stage, thousands of clips) and ``probe`` (the download stage,
  twice per clip): FFmpeg's libraries in this process, through PyAV; no program is started
  per clip.
- ``decode_audio`` (``speech2face predict``: one file at a time, where 0.1 s more does not
  matter): the ffmpeg program via ffmpeg-python.

Any codec FFmpeg decodes, in the containers a recording or a video comes in
(``MEDIA_FORMATS``: MP4/MOV, Matroska/WebM, FLV, AVI, MPEG-TS, MP3, WAV, FLAC, Ogg, ...).
Media come from a CSV or the command line, so FFmpeg reads them as local files only
(``INPUT_OPTIONS``): no network protocol, not even for a playlist inside a file, and no
playlist or concat formats, which would let a file name other files. Every failure comes
back as a ``MediaError`` with a short reason for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import ffmpeg
import numpy as np

from speech2face.core.errors import Speech2FaceError

# FFmpeg demuxer names (a demuxer whose name list contains one of these is allowed).
MEDIA_FORMATS = ("mov", "matroska", "flv", "avi", "mpegts", "mpeg", "asf", "mp3", "wav", "w64", "flac", "ogg",
                 "aac", "aiff", "caf", "amr")
INPUT_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(MEDIA_FORMATS)}


def local_input(path: str | Path) -> str:
    """The path as FFmpeg's input: a relative name starting with '-' gets './' so that no
    program reads it as an option."""
    text = str(path)
    return "./" + text if text.startswith("-") else text


class MediaError(Speech2FaceError):
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
    """Length, streams and picture size of a media file, read in this process through PyAV
    (the fields ffprobe prints): starting the ffprobe program costs about 85 ms a call here,
    reading the header in process about 2 ms, and the download stage probes every video it
    cuts from and every clip it writes or reuses (benchmarks/bench_download.py)."""
    try:
        with av.open(local_input(path), options=dict(INPUT_OPTIONS)) as container:
            return _probe_info(container)
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise MediaError("undecodable", _av_message(error)) from None


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Fit inside max_side keeping aspect; even sizes (what most pixel formats need)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def decode_audio(path: str | Path, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Mono int16 at ``sample_rate`` from the first audio stream of any file ffmpeg reads;
    only its first ``max_seconds`` when given (ffmpeg stops decoding there)."""
    limit = {"t": f"{max_seconds:g}"} if max_seconds is not None else {}
    try:
        out, _ = (
            ffmpeg.input(local_input(path), **INPUT_OPTIONS)
            .output("pipe:", map="0:a:0", ac=1, ar=sample_rate, format="s16le", acodec="pcm_s16le", **limit)
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as error:
        raise MediaError("undecodable_audio", _ffmpeg_message(error)) from None
    return np.frombuffer(out, dtype=np.int16)


def _probe_info(container: "av.container.InputContainer") -> ProbeInfo:
    """What ``probe`` reports, from an open container (the same FFmpeg fields ffprobe prints)."""
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None

    def stream_seconds(stream) -> float:
        return float(stream.duration * stream.time_base) if stream is not None and stream.duration else 0.0

    if container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = max((stream_seconds(s) for s in container.streams), default=0.0)
    video_duration = stream_seconds(video) or duration
    # A stream of a codec FFmpeg cannot decode has no codec context (and no size).
    video_codec = video.codec_context if video is not None else None
    return ProbeInfo(
        duration=duration,
        video_duration=min(video_duration, duration) if duration > 0 else video_duration,
        has_audio=audio is not None,
        has_video=video is not None,
        width=video_codec.width if video_codec is not None else 0,
        height=video_codec.height if video_codec is not None else 0,
    )


class _FrameSelector:
    """ffmpeg's ``select`` filter as this module used it on the command line: the first
    frame at or after each target time, one frame at most per target, ``n`` at most.
    Targets are the middles of ``n`` equal slices of the video, rounded to 0.1 ms as the
    command line's filter expression had them (so the same frames are chosen)."""

    def __init__(self, video_seconds: float, n: int):
        slice_seconds = video_seconds / n
        self.targets = [float(f"{(k + 0.5) * slice_seconds:.4f}") for k in range(n)]
        self.n = n
        self.last_selected: float | None = None
        self.count = 0

    @property
    def done(self) -> bool:
        return self.count >= self.n

    def wants(self, t: float) -> bool:
        if self.done:
            return False
        if self.last_selected is None:
            chosen = t >= self.targets[0]
        else:
            chosen = any(t >= target > self.last_selected for target in self.targets[1:])
        if chosen:
            self.last_selected = t
            self.count += 1
        return chosen


def decode_clip(path: str | Path, n_frames: int, sample_rate: int = 16000,
                max_side: int = 640) -> tuple[np.ndarray, list[np.ndarray], ProbeInfo]:
    """Audio (mono int16) and ``n_frames`` RGB frames evenly spaced through the clip.

    Decoded in this process by FFmpeg's libraries through PyAV, in one pass over the file:
    starting the ffmpeg and ffprobe programs costs about 100 ms each on a 2-core machine
    (ffmpeg links some 200 shared libraries), more than decoding a whole 8 s clip. The
    result is that of ``ffmpeg -i clip -ac 1 -ar RATE`` plus a ``select,scale`` filter for
    the frames (tests/data/test_media.py checks it against the ffmpeg program). Video decoding
    stops once the frames are chosen; audio runs to the end.
    """
    try:
        container = av.open(local_input(path), options=dict(INPUT_OPTIONS))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise MediaError("undecodable", _av_message(error)) from None
    with container:
        info = _probe_info(container)
        if not info.has_video:
            raise MediaError("no_video")
        if not info.has_audio:
            raise MediaError("no_audio")
        if info.video_duration <= 0:
            raise MediaError("undecodable", "zero duration")
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        if video.codec_context is None or audio.codec_context is None or not (info.width and info.height):
            raise MediaError("undecodable", "no decoder for a stream, or a video without a size")
        width, height = scaled_size(info.width, info.height, max_side)
        scale = (width, height) != (info.width, info.height)
        selector = _FrameSelector(info.video_duration, n_frames)
        # The command line's timestamps start at the file's start time (ffmpeg shifts them).
        offset = container.start_time / av.time_base if container.start_time is not None else 0.0
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        pieces: list[np.ndarray] = []
        frames: list[np.ndarray] = []
        bad_packets = 0
        try:
            for packet in container.demux(video, audio):
                if packet.stream.index == video.index and selector.done:
                    continue
                try:
                    decoded = packet.decode()
                except av.InvalidDataError:
                    bad_packets += 1   # ffmpeg skips a damaged packet and goes on; so do we
                    continue
                for frame in decoded:
                    if packet.stream.index == audio.index:
                        pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
                    elif frame.time is not None and selector.wants(frame.time - offset):
                        frames.append(frame.to_ndarray(width=width, height=height, format="rgb24",
                                                       interpolation="BICUBIC") if scale
                                      else frame.to_ndarray(format="rgb24"))
            pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.FFmpegError as error:
            raise MediaError("undecodable", _av_message(error)) from None
    if not frames:
        raise MediaError("no_frames", f"video stream decoded to no frames ({bad_packets} damaged packets)")
    samples = np.concatenate(pieces).astype(np.int16, copy=False) if pieces else np.zeros(0, np.int16)
    if len(samples) == 0:
        raise MediaError("empty_audio")
    return samples, frames, info


def _av_message(error: Exception) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without the errno and
    the file name PyAV adds (the caller's message names the file once)."""
    text = getattr(error, "strerror", None) or str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0][:200]
