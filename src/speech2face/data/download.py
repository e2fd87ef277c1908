"""Download stage library: AVSpeech rows -> one clip per segment, fetched with yt-dlp.

Each CSV row names a video (``youtube_id``) and a segment ``[start, end]``. The URL comes from
a template (``{id}``, ``{root}``). Two ways to get exactly the segment:

- http(s) (YouTube, any server): yt-dlp's section download (``download_ranges`` +
  ``force_keyframes_at_cuts``): ffmpeg reads only the part it needs and re-encodes, so the cut
  is exact rather than snapped to the previous keyframe.
- ``file://`` (the embedded sample): yt-dlp only does full downloads of file URLs, so the whole
  file is fetched to a temp folder and cut by ffmpeg here. The clip is always written as MP4
  with H.264 + AAC: any input ffmpeg reads (FLV/VP6/MP3 included) converts to it, every later
  stage and player decodes it, and it is what yt-dlp's section download produces for the
  default (mp4) format, so both paths give the same kind of file.

Every row ends as one manifest row (ok / failed / skipped + reason). Transient errors
(connection reset, timeouts, HTTP 5xx/408/429, a clip cut short by a dropped connection) are
retried with exponential backoff; permanent ones (404, unsupported URL, segment outside the
video, and YouTube's refusals: ``video_unavailable``, ``age_restricted``, ``sign_in_required``,
``geo_restricted``, and ``bot_check``, which a later run with cookies or a pause retries; see
``YOUTUBE_STATES``) are not. ``availability`` sums up from the manifest how many videos are
gone and whether YouTube refused this machine. A finished clip only appears by an atomic
rename out of a ``.tmp-*`` work folder, so an interrupted run leaves no half-written clip, and
a rerun reuses what is there.
"""

from __future__ import annotations

import http.cookiejar
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import ffmpeg
import pandas as pd
import yt_dlp
from yt_dlp.cookies import YoutubeDLCookieJar
from yt_dlp.utils import download_range_func

from speech2face.core.fsutil import remove_stale_temps
from speech2face.core.params import check, setting
from speech2face.core.reporting import StageSummary, progress
from speech2face.core.tables import FAILED, OK, SKIPPED, write_table
from speech2face.data.avspeech import BadRow, ClipRow, read_csv
from speech2face.data.download_errors import (DownloadFailure, availability, availability_lines, classify_error,
                                              reason_code, short_message)
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

# The manifest on disk: what the stage's output *is*, the same bytes on every machine and
# every rerun. ``url`` keeps the template's ``{root}`` (no absolute path of this checkout);
# ``path`` is as the stage was given it (relative to the project root in the pipeline).
MANIFEST_COLUMNS = ["line", "youtube_id", "start", "end", "x", "y", "clip_id", "url", "status",
                    "reason", "duration", "path"]
# Only in the table ``run_download`` returns: how this run got there (attempts made, clip
# reused from an earlier run) and the URL actually fetched.
RUN_COLUMNS = ["attempts", "reused", "fetched_url"]


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


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str = ""
    duration: float | None = None
    path: Path | None = None
    attempts: int = 0
    reused: bool = False


# --------------------------------------------------------------------------- URLs and errors

def build_url(template: str, youtube_id: str, root: str | Path) -> str:
    """``{id}`` and ``{root}`` filled in by plain replacement (other braces stay literal).

    Only called with ids that passed ``is_safe_id``, so an id cannot change the URL's shape.
    """
    return template.replace("{root}", quote(Path(root).resolve().as_posix())).replace("{id}", youtube_id)


def is_file_url(url: str) -> bool:
    return url.lower().startswith("file:")


# --------------------------------------------------------------------------- one attempt

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


def _ydl_options(work_dir: Path, cfg: FetchSettings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "quiet": True, "no_warnings": True, "noprogress": True, "logger": _QuietLogger(),
        "outtmpl": {"default": str(work_dir / "source.%(ext)s")},
        "format": cfg.format_selector, "merge_output_format": "mp4",
        "socket_timeout": cfg.timeout_seconds,
        # this module does the retrying (with backoff, and only for transient errors)
        "retries": 0, "fragment_retries": 0, "extractor_retries": 0, "file_access_retries": 0,
        "noplaylist": True, "cachedir": False, "overwrites": True,
    }
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


def _check_inside(start: float, end: float, video_seconds: float) -> None:
    if end > video_seconds + END_TOLERANCE:
        raise DownloadFailure("segment_outside_video",
                              f"segment {start:.2f}-{end:.2f} s, video is {video_seconds:.2f} s")


def _downloaded_file(info: dict, work_dir: Path) -> Path:
    for item in info.get("requested_downloads") or []:
        path = item.get("filepath")
        if path and Path(path).is_file():
            return Path(path)
    found = [p for p in work_dir.iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
    if len(found) == 1:
        return found[0]
    raise DownloadFailure("no_file", "yt-dlp reported success but wrote no single file")


def _media_url(info: dict) -> str | None:
    formats = info.get("requested_formats") or [info]
    url = formats[0].get("url")
    return url if isinstance(url, str) and re.match(r"https?://", url) else None


def _remote_duration(url: str | None, timeout_seconds: float) -> float | None:
    """The video's length read by ffprobe over HTTP, or None if that fails too."""
    if url is None:
        return None
    try:
        info = ffmpeg.probe(url, rw_timeout=int(timeout_seconds * 1e6))
        return float(info["format"]["duration"])
    except (ffmpeg.Error, KeyError, ValueError, TypeError):
        return None


def _clip_seconds(path: Path) -> float:
    try:
        return probe(path).duration
    except MediaError:
        return 0.0


def _fetch_section(url: str, row: ClipRow, work_dir: Path, cfg: FetchSettings) -> Path:
    """http(s): yt-dlp downloads just [start, end] and re-encodes at the cuts."""
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
            info = ydl.extract_info(url, download=False)
        except Exception as error:  # noqa: BLE001 - every yt-dlp failure becomes a reason
            raise classify_error(error) from None
        if info is None or info.get("_type") in ("playlist", "multi_video"):
            raise DownloadFailure("not_a_video", "the URL is not a single video")
        known_seconds = info.get("duration")
        if known_seconds:  # YouTube says how long the video is: no download for a bad segment
            _check_inside(row.start, row.end, float(known_seconds))
        try:
            info = ydl.process_ie_result(info, download=True)
        except Exception as error:  # noqa: BLE001
            failure = classify_error(error)
            if failure.transient and not known_seconds:
                # ffmpeg also fails on a start past the end: find out before retrying in vain
                seconds = _remote_duration(_media_url(info), cfg.timeout_seconds)
                if seconds is not None:
                    _check_inside(row.start, row.end, seconds)
            raise failure from None
    clip = _downloaded_file(info, work_dir)
    seconds = _clip_seconds(clip)
    if seconds < row.duration - CUT_TOLERANCE:
        # A dropped connection makes ffmpeg end the clip early *with success*: only a segment
        # past the video's end is a permanent reason for a short clip.
        video_seconds = known_seconds or _remote_duration(_media_url(info), cfg.timeout_seconds)
        if video_seconds:
            _check_inside(row.start, row.end, float(video_seconds))
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


def _fetch_file(url: str, row: ClipRow, work_dir: Path, cfg: FetchSettings) -> Path:
    """file://: yt-dlp copies the whole file (no sections for file URLs), ffmpeg cuts it here."""
    opts = _ydl_options(work_dir, cfg)
    opts["enable_file_urls"] = True
    with yt_dlp.YoutubeDL(opts) as ydl:
        try:
            info = ydl.extract_info(url, download=True)
        except Exception as error:  # noqa: BLE001
            raise classify_error(error) from None
    source = _downloaded_file(info or {}, work_dir)
    try:
        video_seconds = probe(source).duration
    except MediaError as error:
        raise DownloadFailure("undecodable", error.detail or error.reason) from None
    _check_inside(row.start, row.end, video_seconds)
    clip = work_dir / "clip.mp4"
    cut_segment(source, row.start, row.end, clip)
    source.unlink()  # the full video is not needed any more; free the space early
    return clip


def fetch_once(url: str, row: ClipRow, work_dir: Path, cfg: FetchSettings) -> tuple[Path, float]:
    """One attempt: the clip file inside ``work_dir`` and its measured length (ffprobe)."""
    fetch = _fetch_file if is_file_url(url) else _fetch_section
    clip = fetch(url, row, work_dir, cfg)
    seconds = _clip_seconds(clip)
    if abs(seconds - row.duration) > CUT_TOLERANCE:  # short http clips were sorted out above
        raise DownloadFailure("cut_mismatch", f"clip is {seconds:.2f} s, segment is {row.duration:.2f} s")
    if seconds < cfg.min_seconds:
        raise DownloadFailure("too_short", f"clip is {seconds:.2f} s, min_seconds is {cfg.min_seconds:g}")
    return clip, seconds


# --------------------------------------------------------------------------- one row

def finished_clip(out_dir: Path, clip_id: str) -> Path | None:
    """A clip saved by an earlier run (only complete clips ever get a final name)."""
    for path in sorted(out_dir.glob(f"{clip_id}.*")):
        if path.is_file() and not path.name.startswith("."):
            return path
    return None


def _without_work_dir(reason: str, work_dir: Path) -> str:
    """An error message that names a file in the attempt's temp folder names it as
    ``{download}/<file>``: the folder's random name would make every run's manifest differ."""
    return reason.replace(work_dir.resolve().as_posix(), "{download}").replace(work_dir.as_posix(), "{download}")


def download_clip(row: ClipRow, url: str, cfg: FetchSettings, stop: threading.Event | None = None) -> Outcome:
    """Fetch one segment with retries; never raises for a bad row or a network failure.

    ``stop`` (set on Ctrl-C) ends the retrying early instead of starting another attempt.
    """
    stop = stop or threading.Event()
    if row.duration < cfg.min_seconds:
        return Outcome(FAILED, f"too_short: segment is {row.duration:.2f} s, min_seconds is {cfg.min_seconds:g}")
    if is_file_url(url) and not cfg.allow_file_urls:
        return Outcome(FAILED, "file_urls_disabled: set download.allow_file_urls to use file:// URLs")
    attempts = 0
    while not stop.is_set():
        attempts += 1
        work_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{row.clip_id}-", dir=cfg.out_dir))
        try:
            clip, seconds = fetch_once(url, row, work_dir, cfg)
            final = cfg.out_dir / f"{row.clip_id}{clip.suffix}"
            os.replace(clip, final)  # the only way a clip gets its final name
            return Outcome(OK, "", seconds, final, attempts)
        except DownloadFailure as failure:
            if not failure.transient or attempts > cfg.retries:
                reason = _without_work_dir(failure.reason, work_dir)
                if failure.transient:
                    reason += f" (after {attempts} attempts)"
                return Outcome(FAILED, reason, attempts=attempts)
        except Exception as error:  # noqa: BLE001 - one odd row must not stop the stage
            return Outcome(FAILED, _without_work_dir(
                f"internal_error: {type(error).__name__}: {short_message(str(error))}", work_dir), attempts=attempts)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        stop.wait(cfg.backoff_seconds * 2 ** (attempts - 1))
    return Outcome(FAILED, "interrupted", attempts=attempts)


def reuse_clip(row: ClipRow, cfg: FetchSettings) -> Outcome | None:
    """An earlier run's clip if it is there and still the right length (else it is removed)."""
    path = finished_clip(cfg.out_dir, row.clip_id)
    if path is None:
        return None
    seconds = _clip_seconds(path)
    if abs(seconds - row.duration) <= CUT_TOLERANCE and seconds >= cfg.min_seconds:
        return Outcome(OK, "", seconds, path, 0, reused=True)
    path.unlink()
    return None


# --------------------------------------------------------------------------- the stage

def _row_record(row: ClipRow | BadRow, url: str = "", outcome: Outcome | None = None,
                url_template: str = "") -> dict[str, Any]:
    if isinstance(row, BadRow):
        return {"line": row.line, "youtube_id": row.youtube_id, "start": None, "end": None, "x": None,
                "y": None, "clip_id": "", "url": "", "status": SKIPPED, "reason": row.reason,
                "duration": None, "path": "", "attempts": 0, "reused": False, "fetched_url": ""}
    outcome = outcome or Outcome(SKIPPED)
    return {"line": row.line, "youtube_id": row.youtube_id, "start": row.start, "end": row.end,
            "x": row.x, "y": row.y, "clip_id": row.clip_id,
            "url": url_template.replace("{id}", row.youtube_id) if url_template else url,
            "status": outcome.status, "reason": outcome.reason,
            "duration": round(outcome.duration, 3) if outcome.duration is not None else None,
            "path": str(outcome.path) if outcome.path is not None else "", "attempts": outcome.attempts,
            "reused": outcome.reused, "fetched_url": url}


def _relative_to(path: str, root: str | Path) -> str:
    """``path`` relative to the project root when it lies inside it (no machine's absolute
    path in the manifest), else as it is."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path


def remove_unlisted_clips(out_dir: Path, clip_ids: set[str]) -> int:
    """Clips of rows no longer in the CSV selection (e.g. a smaller ``limit``): data/clips
    holds exactly the manifest's clips, so DVC tracks what the params say."""
    removed = 0
    for path in out_dir.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.stem not in clip_ids:
            path.unlink()
            removed += 1
    return removed


def run_download(csv_path: str | Path, out_dir: str | Path, manifest_path: str | Path, url_template: str,
                 root: str | Path, allow_file_urls: bool, limit: int | None, workers: int, retries: int,
                 backoff_seconds: float, timeout_seconds: float, min_seconds: float,
                 format_selector: str = DEFAULT_FORMAT, cookies: str | Path | None = None,
                 sleep_seconds: float = 0.0, max_seconds: float = 60.0) -> pd.DataFrame:
    """Download every row's segment; writes the manifest (``MANIFEST_COLUMNS``, one row per CSV
    row) and returns it with this run's ``RUN_COLUMNS`` added. No row can stop it: each ends
    in the manifest with a status and a reason, even an unforeseen error (``internal_error``).

    ``cookies``: a Netscape cookies.txt sent with every request (YouTube's bot check, age gate);
    ``sleep_seconds``: each worker's pause before a download and between extraction requests;
    ``max_seconds``: longer segments are not downloaded (``too_long``).
    """
    summary = StageSummary("download")
    out_dir, manifest_path = Path(out_dir), Path(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # work folders of a killed run
    for stale in manifest_path.parent.glob(f".tmp-{manifest_path.stem}-*"):
        stale.unlink(missing_ok=True)
    cfg = FetchSettings(out_dir, allow_file_urls, retries, backoff_seconds, timeout_seconds,
                         min_seconds, format_selector,
                         read_cookies(cookies) if cookies is not None else None, sleep_seconds)

    rows = read_csv(csv_path, limit=limit)
    records: list[dict[str, Any] | None] = [None] * len(rows)
    first_line: dict[str, int] = {}
    todo: list[tuple[int, ClipRow, str]] = []
    for i, row in enumerate(rows):
        if isinstance(row, BadRow):
            records[i] = _row_record(row)
        elif row.clip_id in first_line:
            records[i] = _row_record(row, build_url(url_template, row.youtube_id, root), Outcome(
                SKIPPED, f"duplicate_segment: same segment as line {first_line[row.clip_id]}"), url_template)
        elif row.duration > max_seconds:
            records[i] = _row_record(row, build_url(url_template, row.youtube_id, root), Outcome(
                FAILED, f"too_long: segment is {row.duration:.2f} s, max_seconds is {max_seconds:g}"), url_template)
        else:
            first_line[row.clip_id] = row.line
            todo.append((i, row, build_url(url_template, row.youtube_id, root)))
    remove_unlisted_clips(out_dir, set(first_line))

    stop = threading.Event()

    def one(row: ClipRow, url: str) -> Outcome:
        return reuse_clip(row, cfg) or download_clip(row, url, cfg, stop)

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(None, "download", total=len(todo)) as bar:
        futures = {pool.submit(one, row, url): (i, row, url) for i, row, url in todo}
        try:
            for future in as_completed(futures):
                i, row, url = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - a bug for one row is that row's failure
                    detail = (str(error).strip().splitlines() or [""])[0][:160]
                    outcome = Outcome(FAILED, f"internal_error: {type(error).__name__}: {detail}")
                records[i] = _row_record(row, url, outcome, url_template)
                bar.update(1)
        except BaseException:  # Ctrl-C: no queued download starts, no retry follows
            stop.set()
            for future in futures:
                future.cancel()
            raise

    manifest = pd.DataFrame([r for r in records if r is not None], columns=MANIFEST_COLUMNS + RUN_COLUMNS)
    for status, reason, reused in zip(manifest["status"], manifest["reason"], manifest["reused"]):
        if status == OK and reused:
            summary.reuse()
        elif status == OK:
            summary.ok()
        else:
            summary.skip(reason_code(reason))
    # error messages may quote the source's full path: the project root becomes {root}
    root_text = Path(root).resolve().as_posix()
    if root_text != "/":
        manifest["reason"] = manifest["reason"].map(lambda r: r.replace(quote(root_text), "{root}")
                                                    .replace(root_text, "{root}"))
    write_table(manifest[MANIFEST_COLUMNS].assign(path=manifest["path"].map(lambda p: _relative_to(p, root))),
                manifest_path)
    for line in availability_lines(availability(manifest)):  # before the summary: it stays last
        print(line, flush=True)
    summary.print()
    return manifest


URL_SCHEMES = ("http://", "https://", "file://")


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """The ``download`` section of params.yaml."""

    SECTION: ClassVar[str] = "download"
    csv: str = setting("data/sample/avspeech_sample.csv")   # AVSpeech format: youtube_id,start,end,x,y
    limit: int | None = setting(None, minimum=1)            # first N CSV rows; null = all
    url_template: str = setting("file://{root}/data/sample/videos/{id}.mp4")
    allow_file_urls: bool = setting(True)                   # file:// URLs only when true
    workers: int = setting(4, minimum=1)                    # parallel downloads
    retries: int = setting(3, minimum=0)                    # extra attempts on transient errors
    backoff_seconds: float = setting(1.0, minimum=0.0, maximum=600.0)   # first retry delay, doubled each time
    timeout_seconds: float = setting(30.0, minimum=0.1)     # socket timeout per request
    min_seconds: float = setting(1.0, minimum=0.0)          # shorter segments are recorded as too_short
    max_seconds: float = setting(60.0, above=0.0)           # longer segments are recorded as too_long
    format: str = setting(DEFAULT_FORMAT)                   # yt-dlp format selector
    cookies: str | None = setting(None, expected="null or the path of a cookies.txt file")
    sleep_seconds: float = setting(0.0, minimum=0.0, maximum=600.0)     # each worker's pause per request

    def check(self) -> None:
        check(Path(self.csv).is_file(), self.SECTION, "csv", self.csv, "an existing CSV file")
        check(self.max_seconds >= self.min_seconds, self.SECTION, "max_seconds", self.max_seconds,
              f"a number >= min_seconds ({self.min_seconds:g})")
        check("{id}" in self.url_template and self.url_template.lower().startswith(URL_SCHEMES), self.SECTION,
              "url_template", self.url_template, "a URL with {id} starting with http://, https:// or file://")
        if self.cookies is not None:
            path = Path(self.cookies).expanduser()
            check(path.is_file(), self.SECTION, "cookies", self.cookies, "null or an existing cookies.txt file")
            try:
                read_cookies(path)
            except ValueError as error:
                check(False, self.SECTION, "cookies", self.cookies, f"a Netscape cookies.txt file ({error})")


def download_stage(config: DownloadConfig, out_dir: str | Path, manifest_path: str | Path,
                   root: str | Path) -> pd.DataFrame:
    """``run_download`` with the settings of the ``download`` section."""
    cookies = str(Path(config.cookies).expanduser()) if config.cookies is not None else None
    return run_download(config.csv, out_dir, manifest_path, config.url_template, root, config.allow_file_urls,
                        config.limit, config.workers, config.retries, config.backoff_seconds,
                        config.timeout_seconds, config.min_seconds, config.format, cookies=cookies,
                        sleep_seconds=config.sleep_seconds, max_seconds=config.max_seconds)
