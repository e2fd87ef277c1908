"""Fetching the segments of one video: resolve the video once, then cut each segment from it.

A video is *resolved* once (``resolve``) and every segment of it is cut from that one
resolution (``fetch_segment``), so a video with six AVSpeech segments costs one page/metadata
request, not six:

- http(s) (YouTube, any server): one yt-dlp extraction without download (the page and player
  requests, the format choice, the video's length). Each segment is then yt-dlp's section
  download from those resolved formats (``download_ranges`` + ``force_keyframes_at_cuts``):
  ffmpeg reads only the part it needs and re-encodes, so the cut is exact rather than snapped
  to the previous keyframe. A segment past the video's end is refused before any download.
- ``file://`` (the embedded sample): the source file is read in place (no copy) and ffmpeg
  cuts each segment from it. The clip is always written as MP4 with H.264 + AAC
  (``CLIP_ENCODING``): any input ffmpeg reads (FLV/VP6/MP3 included) converts to it, every
  later stage and player decodes it, and it is what yt-dlp's section download produces for
  the default (mp4) format, so both paths give the same kind of file.

Failures are ``DownloadFailure``s (a manifest code, and whether a retry can help); the
retrying, the pauses and the politeness are the download stage's (``speech2face.data.download``).
"""

from __future__ import annotations

import copy
import http.cookiejar
import io
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import ffmpeg
import yt_dlp
from yt_dlp.cookies import YoutubeDLCookieJar
from yt_dlp.utils import download_range_func

from speech2face.data.avspeech import ClipRow
from speech2face.data.download_errors import DownloadFailure, classify_error
from speech2face.data.media import INPUT_OPTIONS, MediaError, local_input, probe

# H.264/AAC in MP4 where the site offers it (no slow VP9 re-encode at the cuts), at most 720p
# (faces are cropped to 224 px later), else whatever single file the site has.
DEFAULT_FORMAT = "bv*[ext=mp4][height<=720]+ba[ext=m4a]/b[ext=mp4][height<=720]/b"

# A saved clip may differ from end - start by this much (frame and audio-packet rounding).
CUT_TOLERANCE = 0.2
# A segment may end this far past the video's end (AVSpeech rounds its times) and still count
# as inside; smaller than CUT_TOLERANCE so such a clip still passes the length check.
END_TOLERANCE = 0.1

# How every clip is encoded, on both paths (our cut of a file:// source, and yt-dlp's
# section download over http(s)). The cut is frame-exact: ffmpeg decodes from the keyframe
# before ``start`` and drops frames before it, and keeps frames that start before ``end``
# (tests/data/test_download.py checks every frame number). The bytes are reproducible: x264
# with one thread (its output depends on the thread count, and "auto" follows the
# machine's cores), bit-exact muxing (no encoder version string), no copied metadata.
CLIP_ENCODING = (
    # 4:2:0 H.264 needs even sizes; most players need yuv420p
    "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
    "-pix_fmt", "yuv420p", "-threads", "1",
    "-c:a", "aac", "-b:a", "128k",
    "-map_metadata", "-1", "-map_chapters", "-1",
    "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
    "-movflags", "+faststart",
)


@dataclass(frozen=True)
class FetchSettings:
    out_dir: Path
    allow_file_urls: bool
    retries: int               # extra attempts after a transient failure
    backoff_seconds: float     # delay before the first retry, doubled for each next one
    timeout_seconds: float     # socket / ffmpeg read timeout per request
    min_seconds: float
    format_selector: str = DEFAULT_FORMAT
    cookies: str | None = None  # cookies.txt text (see read_cookies), sent with every request
    sleep_seconds: float = 0.0  # pause before each download and between extraction requests


def is_file_url(url: str) -> bool:
    return url.lower().startswith("file:")


# --------------------------------------------------------------------------- yt-dlp

class _QuietLogger:
    """yt-dlp talks to this instead of the console; its errors come back as exceptions."""

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def read_cookies(path: str | Path) -> str:
    """A Netscape cookies.txt as yt-dlp's own parser reads it, written back out in its format.

    ValueError (one line) if it cannot be read or holds no cookie. Lines yt-dlp cannot parse
    are skipped with a warning here, once, rather than by every download that loads the text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read it ({type(error).__name__})") from None
    jar = YoutubeDLCookieJar(io.StringIO(text))
    try:
        jar.load()
    except http.cookiejar.LoadError as error:
        reason = "JSON, not Netscape format" if "not JSON" in str(error) else \
            "no '# Netscape HTTP Cookie File' first line"
        raise ValueError(reason) from None
    if len(jar) == 0:
        raise ValueError("no cookies in it")
    out = io.StringIO()
    jar.save(out)
    return out.getvalue()


def _ydl_options(work_dir: Path | None, cfg: FetchSettings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "quiet": True, "no_warnings": True, "noprogress": True, "logger": _QuietLogger(),
        "format": cfg.format_selector, "merge_output_format": "mp4",
        "socket_timeout": cfg.timeout_seconds,
        # the download stage does the retrying (with backoff, and only for transient errors)
        "retries": 0, "fragment_retries": 0, "extractor_retries": 0, "file_access_retries": 0,
        "noplaylist": True, "cachedir": False, "overwrites": True,
    }
    if work_dir is not None:
        opts["outtmpl"] = {"default": str(work_dir / "source.%(ext)s")}
    if cfg.cookies is not None:
        # A private in-memory copy per YoutubeDL: yt-dlp writes its cookie jar back to the
        # cookiefile when it closes, and parallel workers rewriting the user's file at once
        # could leave it truncated for the next one to read.
        opts["cookiefile"] = io.StringIO(cfg.cookies)
    if cfg.sleep_seconds > 0:
        # sleep_interval: before each download (per worker); sleep_interval_requests: between
        # the extractor's requests (YouTube's page and player API calls), the first one excepted
        opts["sleep_interval"] = cfg.sleep_seconds
        opts["sleep_interval_requests"] = cfg.sleep_seconds
    return opts


# --------------------------------------------------------------------------- sources

def check_inside(start: float, end: float, video_seconds: float) -> None:
    if end > video_seconds + END_TOLERANCE:
        raise DownloadFailure("segment_outside_video",
                              f"segment {start:.2f}-{end:.2f} s, video is {video_seconds:.2f} s")


def clip_seconds(path: Path) -> float:
    try:
        return probe(path).duration
    except MediaError:
        return 0.0


@dataclass
class FileSource:
    """A local video, read in place; its length was measured when it was resolved."""

    url: str
    path: Path
    seconds: float


@dataclass
class WebSource:
    """A video resolved by yt-dlp: its info dict (formats with their URLs, length if known)."""

    url: str
    info: dict[str, Any]
    known_seconds: float | None
    _probed: list[float | None] = field(default_factory=list)   # ffprobe's answer, asked at most once
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def media_url(self) -> str | None:
        formats = self.info.get("requested_formats") or [self.info]
        url = formats[0].get("url")
        return url if isinstance(url, str) and re.match(r"https?://", url) else None

    def seconds(self, timeout_seconds: float) -> float | None:
        """The video's length: the site's word, else ffprobe over HTTP (once), else None."""
        if self.known_seconds:
            return self.known_seconds
        with self._lock:
            if not self._probed:
                self._probed.append(_remote_duration(self.media_url(), timeout_seconds))
            return self._probed[0]


Source = FileSource | WebSource


def file_url_path(url: str) -> Path:
    """The local path a ``file://`` URL names (``{root}`` was filled in percent-encoded)."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise DownloadFailure("unsupported_url", f"file URL on another host: {parsed.netloc}")
    return Path(url2pathname(parsed.path))   # which also decodes the %-escapes


def resolve(url: str, cfg: FetchSettings) -> Source:
    """One resolution of a video: its file, or yt-dlp's info without downloading anything."""
    if is_file_url(url):
        return _resolve_file(url)
    opts = _ydl_options(None, cfg)
    with yt_dlp.YoutubeDL(opts) as ydl:
        try:
            info = ydl.extract_info(url, download=False)
        except Exception as error:  # noqa: BLE001 - every yt-dlp failure becomes a reason
            raise classify_error(error) from None
        if info is None or info.get("_type") in ("playlist", "multi_video"):
            raise DownloadFailure("not_a_video", "the URL is not a single video")
        # JSON-safe copy: what --load-info-json would read back, and each segment works on its own copy
        info = ydl.sanitize_info(info)
    seconds = info.get("duration")
    return WebSource(url, info, float(seconds) if seconds else None)


def _resolve_file(url: str) -> FileSource:
    path = file_url_path(url)
    if not path.is_file():
        raise DownloadFailure("not_found", f"no file at {path}")
    try:
        seconds = probe(path).duration
    except MediaError as error:
        raise DownloadFailure("undecodable", error.detail or error.reason) from None
    return FileSource(url, path, seconds)


def _remote_duration(url: str | None, timeout_seconds: float) -> float | None:
    """The video's length read by ffprobe over HTTP, or None if that fails too."""
    if url is None:
        return None
    try:
        info = ffmpeg.probe(url, rw_timeout=int(timeout_seconds * 1e6))
        return float(info["format"]["duration"])
    except (ffmpeg.Error, KeyError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- one segment

def fetch_segment(source: Source, row: ClipRow, work_dir: Path, cfg: FetchSettings) -> tuple[Path, float]:
    """One attempt at one segment: the clip file inside ``work_dir`` and its measured length."""
    if isinstance(source, FileSource):
        check_inside(row.start, row.end, source.seconds)
        clip = work_dir / "clip.mp4"
        cut_segment(source.path, row.start, row.end, clip)
    else:
        clip = _fetch_section(source, row, work_dir, cfg)
    seconds = clip_seconds(clip)
    if abs(seconds - row.duration) > CUT_TOLERANCE:  # short http clips were sorted out before
        raise DownloadFailure("cut_mismatch", f"clip is {seconds:.2f} s, segment is {row.duration:.2f} s")
    if seconds < cfg.min_seconds:
        raise DownloadFailure("too_short", f"clip is {seconds:.2f} s, min_seconds is {cfg.min_seconds:g}")
    return clip, seconds


def _downloaded_file(info: dict, work_dir: Path) -> Path:
    for item in info.get("requested_downloads") or []:
        path = item.get("filepath")
        if path and Path(path).is_file():
            return Path(path)
    found = [p for p in work_dir.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if len(found) == 1:
        return found[0]
    raise DownloadFailure("no_file", "yt-dlp reported success but wrote no single file")


def _fetch_section(source: WebSource, row: ClipRow, work_dir: Path, cfg: FetchSettings) -> Path:
    """http(s): yt-dlp downloads just [start, end] of the resolved video and re-encodes at the cuts."""
    if source.known_seconds:  # the site said how long the video is: no download for a bad segment
        check_inside(row.start, row.end, source.known_seconds)
    opts = _ydl_options(work_dir, cfg)
    opts.update({
        "download_ranges": download_range_func(None, [(row.start, row.end)]),
        "force_keyframes_at_cuts": True,
        # ffmpeg does the section's HTTP reads; without this it waits forever on a stalled server
        "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", str(int(cfg.timeout_seconds * 1e6))],
                                     "ffmpeg_o": list(CLIP_ENCODING)},
    })
    with yt_dlp.YoutubeDL(opts) as ydl:
        try:
            # format selection and the download from the resolved info: no new page request
            info = ydl.process_ie_result(copy.deepcopy(source.info), download=True)
        except Exception as error:  # noqa: BLE001
            failure = classify_error(error)
            if failure.transient:
                # ffmpeg also fails on a start past the end: find out before retrying in vain
                seconds = source.seconds(cfg.timeout_seconds)
                if seconds is not None:
                    check_inside(row.start, row.end, seconds)
            raise failure from None
    clip = _downloaded_file(info, work_dir)
    seconds = clip_seconds(clip)
    if seconds < row.duration - CUT_TOLERANCE:
        # A dropped connection makes ffmpeg end the clip early *with success*: only a segment
        # past the video's end is a permanent reason for a short clip.
        video_seconds = source.seconds(cfg.timeout_seconds)
        if video_seconds:
            check_inside(row.start, row.end, video_seconds)
        raise DownloadFailure("incomplete_clip", f"got {seconds:.2f} s of {row.duration:.2f} s",
                              transient=True)
    return clip


def cut_segment(source: Path, start: float, end: float, out: Path, timeout: float = 600) -> None:
    """Exact cut by re-encoding to MP4 (H.264 + AAC); raises DownloadFailure on an ffmpeg error."""
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        *(arg for name, value in INPUT_OPTIONS.items() for arg in (f"-{name}", value)),   # local files only
        "-ss", f"{start:.3f}", "-i", local_input(source), "-t", f"{end - start:.3f}",
        "-map", "0:v:0?", "-map", "0:a:0?", "-sn", "-dn",
        *CLIP_ENCODING, "-f", "mp4", str(out),
    ]
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DownloadFailure("cut_failed", f"ffmpeg took over {timeout:.0f} s") from None
    if result.returncode != 0 or not out.is_file():
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DownloadFailure("cut_failed", lines[-1][:160] if lines else f"ffmpeg exit {result.returncode}")
