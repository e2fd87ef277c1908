"""What went wrong with a download, in the manifest's words.

- ``classify_error``: a yt-dlp exception -> ``DownloadFailure`` (a stable reason code, a short
  message, and whether a retry can help). HTTP statuses, file and network errors come from
  the exception's type; YouTube's refusals ("Video unavailable", "Private video", "Sign in to
  confirm you're not a bot", ...) only from its words (``YOUTUBE_STATES``).
- ``availability``: what a finished manifest says about the source: how many videos are gone,
  whether YouTube refused this machine, how many clips need a signed-in account. The
  download stage prints it (``availability_lines``) before its summary line.
"""

from __future__ import annotations

import re
import urllib.error
from typing import Any

import pandas as pd
from yt_dlp.networking.exceptions import CertificateVerifyError, HTTPError, TransportError
from yt_dlp.utils import ContentTooShortError, ExtractorError, GeoRestrictedError, UnsupportedError

from speech2face.core.errors import Speech2FaceError
from speech2face.core.tables import FAILED, OK


class DownloadFailure(Speech2FaceError):
    """One attempt failed. ``code`` is the manifest's reason code, ``transient`` says retry."""

    def __init__(self, code: str, message: str = "", transient: bool = False):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.transient = transient

    @property
    def reason(self) -> str:
        return str(self)


def short_message(text: str, limit: int = 160) -> str:
    """yt-dlp's error line without its 'ERROR: [extractor] id:' prefix and '(caused by ...)' tail."""
    text = re.sub(r"^ERROR:\s*", "", text.strip())
    text = re.sub(r"^\[[^\]]+\]\s*(?:[\w-]+:\s+)?", "", text)
    text = re.sub(r"\s*\(caused by .*$", "", text, flags=re.S)
    # yt-dlp's advice names its command-line flags (--cookies, -t sleep, --proxy); here the
    # remedies are download.cookies / download.sleep_seconds, which the stage's hint names.
    text = re.sub(r"\s*(?:Use --cookies|It is recommended to use|For more information, refer to|"
                  r"You might want to use a VPN).*$", "", text, flags=re.S)
    text = " ".join(text.split())
    return text[:limit]


def _exception_chain(error: BaseException) -> list[BaseException]:
    """The error and everything behind it: yt-dlp keeps causes in ``exc_info`` and ``cause``."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    todo: list[Any] = [error]
    while todo:
        exc = todo.pop(0)
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        chain.append(exc)
        exc_info = getattr(exc, "exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) == 3:
            todo.append(exc_info[1])
        todo.extend([getattr(exc, "cause", None), exc.__cause__, exc.__context__])
    return chain


# YouTube explains why it will not play a video in words (the player response's
# playabilityStatus reason and subreason), which yt-dlp's youtube extractor passes on inside an
# ExtractorError as "<reason>. <subreason>[. <its cookie advice>]". The phrases below are those
# texts (lower case, ’ written '); the first group that matches names the manifest code, so the
# order matters: a private video's text says "Sign in if you've been granted access" and carries
# yt-dlp's "--cookies" advice, and a country block or an age gate may open with "Video
# unavailable".
# - bot_check: YouTube refuses this IP or session, not the video ("confirm you're not a bot",
#   captcha, "rate-limited by YouTube for up to an hour"). One worker's backoff of seconds
#   would not outlast such a block, and every retry is one more request that keeps it going:
#   like HTTP 429 it pauses every worker (speech2face.data.politeness, doubling up to an hour)
#   before the retry, and cookies / sleep_seconds / requests_per_second and another run are
#   the fix when it persists. It is no verdict on the video: ``availability`` counts it apart.
# - the others are verdicts on the video (gone, or needs an account), not retried within the
#   run: they do not change on retry.
YOUTUBE_STATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bot_check", ("confirm you're not a bot", "captcha challenge", "ip is likely being blocked",
                   "rate-limited by youtube", "content isn't available, try again later")),
    # playable from elsewhere (a proxy or VPN), so not counted as gone
    ("geo_restricted", ("available in your country", "from your location",
                        "in your country on copyright grounds")),
    ("age_restricted", ("confirm your age", "age-restricted", "age restricted", "inappropriate for some users")),
    ("video_unavailable", ("video unavailable", "this video is unavailable", "this video is not available",
                           "this video isn't available anymore", "this video has been removed",
                           "this video is no longer available", "has been terminated",
                           "closed their youtube account", "private video", "this video is private",
                           # needs a paid membership: for building a data set as gone as private
                           "members-only content", "only available to music premium members",
                           "requires payment to watch")),
    ("sign_in_required", ("sign in", "--cookies", "only available for registered users",
                          "login details are needed")),
)
VIDEO_UNAVAILABLE = "video_unavailable"
# The video is gone: YouTube's words, or a plain server's / the file system's answer
GONE_CODES = (VIDEO_UNAVAILABLE, "http_404", "http_410", "not_found")
BLOCKED_CODES = ("bot_check", "http_429")                    # YouTube refused this machine
SIGN_IN_CODES = ("age_restricted", "sign_in_required")       # a signed-in account (cookies) may help


def youtube_state(text: str) -> str | None:
    """The manifest code for YouTube's refusal worded in ``text``, or None."""
    text = text.lower().replace("\u2019", "'")
    for code, phrases in YOUTUBE_STATES:
        if any(phrase in text for phrase in phrases):
            return code
    return None


def classify_error(error: BaseException) -> DownloadFailure:
    """Map a yt-dlp exception to a manifest code and whether a retry can help."""
    chain = _exception_chain(error)
    message = short_message(str(error))
    if any(isinstance(exc, GeoRestrictedError) for exc in chain):
        return DownloadFailure("geo_restricted", message)
    # Only a site's own refusal (an ExtractorError raised with no cause) is read for words: a
    # network or file error's text, or "Unsupported URL: ...", carries URLs and paths, which
    # could hold any phrase.
    state = youtube_state(" ".join(exc.orig_msg for exc in chain if isinstance(exc, ExtractorError)
                                   and exc.cause is None and not isinstance(exc, UnsupportedError)))
    if state is not None:
        return DownloadFailure(state, message)
    for exc in chain:
        status = None
        if isinstance(exc, HTTPError):
            status = exc.status
        elif isinstance(exc, urllib.error.HTTPError):
            status = exc.code
        if status is not None:
            return DownloadFailure(f"http_{status}", message, status >= 500 or status in (408, 429))
    for exc in chain:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            return DownloadFailure("not_found", message)
        if isinstance(exc, UnsupportedError):
            return DownloadFailure("unsupported_url", message)
        if isinstance(exc, CertificateVerifyError):
            return DownloadFailure("ssl_error", message)
    for exc in chain:
        if isinstance(exc, (TransportError, ContentTooShortError, TimeoutError, ConnectionError)):
            return DownloadFailure("network_error", message, transient=True)
    if re.search(r"\bffmpeg exited with code", message):
        # yt-dlp hides ffmpeg's own message; after the URL answered, what makes ffmpeg fail
        # is mostly the network (reset, read timeout), so it is worth another attempt.
        return DownloadFailure("ffmpeg_failed", message, transient=True)
    if "not a valid URL" in message or "Unsupported URL" in message:
        return DownloadFailure("unsupported_url", message)
    return DownloadFailure("download_error", message)


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


class Availability:
    """``availability``'s counts, gathered one manifest row at a time (a stage that streams
    its rows keeps only these sets of video ids, not the rows)."""

    def __init__(self) -> None:
        self.answered: set[str] = set()
        self.gone: set[str] = set()
        self.clips_lost = 0
        self.blocked = {code: 0 for code in BLOCKED_CODES}
        self.blocked_videos: set[str] = set()
        self.sign_in = {code: 0 for code in SIGN_IN_CODES}

    def add(self, youtube_id: str, status: str, reason: str, attempts: float) -> None:
        code = reason_code(reason)
        failed = status == FAILED
        if status == OK or (failed and attempts >= 1 and code not in (*BLOCKED_CODES, "interrupted")):
            self.answered.add(youtube_id)
        if not failed:
            return
        if code in GONE_CODES:
            self.gone.add(youtube_id)
            self.clips_lost += 1
        if code in self.blocked:
            self.blocked[code] += 1
            self.blocked_videos.add(youtube_id)
        if code in self.sign_in:
            self.sign_in[code] += 1

    def stats(self) -> dict[str, Any]:
        return {"videos": len(self.answered), "unavailable": len(self.gone), "clips_lost": self.clips_lost,
                "blocked": dict(self.blocked), "blocked_videos": len(self.blocked_videos),
                "sign_in": dict(self.sign_in)}


def availability(manifest: pd.DataFrame) -> dict[str, Any]:
    """How much of the selection the source still has, read from the manifest's rows.

    - ``videos``: distinct ``youtube_id`` the source gave an answer about: a row that is ok, or
      that failed after at least one attempt for any reason but a refusal of this machine
      (``BLOCKED_CODES``) or an interrupt. Rows never fetched (bad rows, duplicates, too short)
      and blocked ones say nothing about the video.
    - ``unavailable``: of those, the videos with a row in ``GONE_CODES`` (YouTube's
      ``video_unavailable``, or a 404/410 or missing file elsewhere); ``clips_lost``: those
      rows (segments, not counting skipped duplicates).
    - ``blocked``: failed rows per code in ``BLOCKED_CODES`` and ``blocked_videos`` their
      distinct videos; ``sign_in``: failed rows per code in ``SIGN_IN_CODES``.
    """
    counts = Availability()
    attempts = pd.to_numeric(manifest["attempts"], errors="coerce").fillna(0)
    for youtube_id, status, reason, tries in zip(manifest["youtube_id"].astype(str), manifest["status"].astype(str),
                                                 manifest["reason"].fillna("").astype(str), attempts):
        counts.add(youtube_id, status, reason, tries)
    return counts.stats()


def availability_lines(stats: dict[str, Any], stage: str = "download") -> list[str]:
    """What the stage prints about ``availability(manifest)``: the share of videos gone, and
    what to set when YouTube refused this machine or wanted an account."""
    lines = []
    if stats["videos"]:
        share = 100.0 * stats["unavailable"] / stats["videos"]
        lines.append(f"{stage}: videos no longer available: {stats['unavailable']} of {stats['videos']} "
                     f"({share:.1f} %); clips lost with them: {stats['clips_lost']}")
    n_blocked = sum(stats["blocked"].values())
    if n_blocked:
        counts = ", ".join(f"{code}: {n}" for code, n in stats["blocked"].items() if n)
        lines.append(f"{stage}: YouTube refused this machine for {n_blocked} clips of "
                     f"{stats['blocked_videos']} videos ({counts}): set download.cookies / "
                     "download.sleep_seconds and run again (failed rows are retried)")
    n_sign_in = sum(stats["sign_in"].values())
    if n_sign_in:
        counts = ", ".join(f"{code}: {n}" for code, n in stats["sign_in"].items() if n)
        lines.append(f"{stage}: {n_sign_in} clips need a signed-in YouTube account ({counts}): "
                     "set download.cookies")
    return lines
