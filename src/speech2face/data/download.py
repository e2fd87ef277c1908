"""Download stage library: AVSpeech rows -> one clip per segment, fetched with yt-dlp.

Each CSV row names a video (``youtube_id``) and a segment ``[start, end]``. The URL comes from
a template (``{id}``, ``{root}``). The CSV is streamed: rows are read as the workers need
them, consecutive rows of one video (AVSpeech lists a video's segments together) become one
*video job*, and at most ``max_rows_pending(workers)`` rows are between the reader and the
manifest at any time, so a CSV of millions of rows takes the memory of a few thousand (the
set of clip ids, for duplicates, is the one thing that grows with the CSV).

A video job resolves its video once and cuts every segment from that resolution
(``speech2face.data.fetch``): one page/metadata request per video, not per segment.
Requests are made through a ``RequestGate`` (per-host concurrency, a global request rate,
and a pause for every worker when the site says "too many requests" or asks for a bot
check; ``speech2face.data.politeness``).

Every row ends as one manifest row (ok / failed / skipped + reason), in CSV order. Transient
errors (connection reset, timeouts, HTTP 5xx/408, a clip cut short by a dropped connection)
are retried with exponential backoff, refusals of this machine (HTTP 429, YouTube's bot
check) after the gate's pause; permanent ones (404, unsupported URL, segment outside the
video, and YouTube's verdicts: ``video_unavailable``, ``age_restricted``,
``sign_in_required``, ``geo_restricted``; see ``YOUTUBE_STATES``) are not. A failed segment
does not fail its siblings. ``availability`` sums up how many videos are gone and whether
YouTube refused this machine. A finished clip only appears by an atomic rename out of a
``.tmp-*`` work folder, so an interrupted run leaves no half-written clip, and a rerun reuses
what is there (without a request).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, TypeVar
from urllib.parse import quote

import pandas as pd

from speech2face.core.fsutil import remove_stale_temps
from speech2face.core.params import check, setting
from speech2face.core.reporting import StageSummary, progress
from speech2face.core.tables import FAILED, OK, SKIPPED, table_writer
from speech2face.data.avspeech import BadRow, ClipRow, iter_csv
from speech2face.data.download_errors import (BLOCKED_CODES, Availability, DownloadFailure, availability_lines,
                                              reason_code, short_message)
from speech2face.data.fetch import (CUT_TOLERANCE, DEFAULT_FORMAT, FetchSettings, Source, clip_seconds, fetch_segment,
                                    is_file_url, read_cookies, resolve)
from speech2face.data.politeness import RequestGate

__all__ = ["DownloadConfig", "download_stage", "download_rows", "run_download", "read_cookies",
           "MANIFEST_COLUMNS", "RUN_COLUMNS"]

# The manifest on disk: what the stage's output *is*, the same bytes on every machine and
# every rerun. ``url`` keeps the template's ``{root}`` (no absolute path of this checkout);
# ``path`` is as the stage was given it (relative to the project root in the pipeline).
MANIFEST_COLUMNS = ["line", "youtube_id", "start", "end", "x", "y", "clip_id", "url", "status",
                    "reason", "duration", "path"]
# Only in the records ``on_record`` receives (and the table ``run_download`` returns): how this
# run got there (tries it took, clip reused from an earlier run) and the URL actually fetched.
RUN_COLUMNS = ["attempts", "reused", "fetched_url"]

# One video job holds at most this many segments: a video listed thousands of times cannot
# make one job (and the rows waiting behind it) unbounded; it is resolved once per batch.
MAX_SEGMENTS_PER_JOB = 64


def max_rows_pending(workers: int) -> int:
    """Rows read from the CSV but not yet written to the manifest, at most (memory bound)."""
    return max(1024, 4 * MAX_SEGMENTS_PER_JOB * workers)


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str = ""
    duration: float | None = None
    path: Path | None = None
    attempts: int = 0
    reused: bool = False


@dataclass
class VideoJob:
    """Consecutive CSV rows of one video: resolved once, cut segment by segment."""

    youtube_id: str
    url: str
    segments: list[tuple[int, ClipRow]] = field(default_factory=list)   # (manifest position, row)


def build_url(template: str, youtube_id: str, root: str | Path) -> str:
    """``{id}`` and ``{root}`` filled in by plain replacement (other braces stay literal).

    Only called with ids that passed ``is_safe_id``, so an id cannot change the URL's shape.
    """
    return template.replace("{root}", quote(Path(root).resolve().as_posix())).replace("{id}", youtube_id)


# --------------------------------------------------------------------------- one video

class Interrupted(Exception):
    """The run is stopping (Ctrl-C): no new request, no retry."""


T = TypeVar("T")


def with_retries(step: Callable[[], T], cfg: FetchSettings, gate: RequestGate) -> tuple[T, int]:
    """``step()`` until it succeeds, fails for good, or runs out of ``cfg.retries``.

    Returns (result, tries). A failure is re-raised with ``attempts`` set on it. Transient
    failures wait ``backoff_seconds`` (doubled each time) in this worker; a refusal of this
    machine (429, bot check) pauses every worker through the gate and is then retried too.
    """
    attempts = 0
    while True:
        if not gate.before_request():
            raise Interrupted
        attempts += 1
        try:
            result = step()
        except DownloadFailure as failure:
            blocked = failure.code in BLOCKED_CODES
            if blocked:
                gate.blocked()
            if not (failure.transient or blocked) or attempts > cfg.retries:
                failure.attempts = attempts  # type: ignore[attr-defined]
                raise
            if not blocked and gate.stop.wait(cfg.backoff_seconds * 2 ** (attempts - 1)):
                raise Interrupted from None
            continue
        gate.succeeded()
        return result, attempts


def _failure_reason(failure: DownloadFailure, attempts: int) -> str:
    return failure.reason + (f" (after {attempts} attempts)" if attempts > 1 else "")


def _without_work_dir(reason: str, work_dir: Path) -> str:
    """An error message that names a file in the attempt's temp folder names it as
    ``{download}/<file>``: the folder's random name would make every run's manifest differ."""
    return reason.replace(work_dir.resolve().as_posix(), "{download}").replace(work_dir.as_posix(), "{download}")


def save_segment(source: Source, row: ClipRow, cfg: FetchSettings) -> tuple[Path, float]:
    """One attempt at one segment, in its own ``.tmp-*`` folder; the clip gets its final name
    by an atomic rename, the only way a clip ever gets one."""
    work_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{row.clip_id}-", dir=cfg.out_dir))
    try:
        clip, seconds = fetch_segment(source, row, work_dir, cfg)
        final = cfg.out_dir / f"{row.clip_id}{clip.suffix}"
        os.replace(clip, final)
        return final, seconds
    except DownloadFailure as failure:
        raise DownloadFailure(failure.code, _without_work_dir(failure.message, work_dir),
                              failure.transient) from None
    except Exception as error:  # noqa: BLE001 - one odd segment must not stop the stage
        raise DownloadFailure("internal_error", _without_work_dir(
            f"{type(error).__name__}: {short_message(str(error))}", work_dir)) from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def finished_clip(out_dir: Path, clip_id: str) -> Path | None:
    """A clip saved by an earlier run (only complete clips ever get a final name)."""
    for path in sorted(out_dir.glob(f"{clip_id}.*")):
        if path.is_file() and not path.name.startswith("."):
            return path
    return None


def reuse_clip(row: ClipRow, cfg: FetchSettings) -> Outcome | None:
    """An earlier run's clip if it is there and still the right length (else it is removed)."""
    path = finished_clip(cfg.out_dir, row.clip_id)
    if path is None:
        return None
    seconds = clip_seconds(path)
    if abs(seconds - row.duration) <= CUT_TOLERANCE and seconds >= cfg.min_seconds:
        return Outcome(OK, "", seconds, path, 0, reused=True)
    path.unlink()
    return None


def download_video(job: VideoJob, cfg: FetchSettings, gate: RequestGate) -> list[tuple[int, Outcome]]:
    """Every segment of one video: reused, or cut from one resolution of the video. Never
    raises for a bad video or a network failure; a failed segment leaves its siblings alone.

    ``attempts`` of a segment: the tries it took; the first segment fetched also carries its
    video's failed resolution tries (so a resolution that failed once, then worked, shows 2).
    """
    results = []
    todo = []
    for position, row in job.segments:
        reused = reuse_clip(row, cfg)
        if reused is not None:
            results.append((position, reused))
        else:
            todo.append((position, row))
    if not todo:
        return results
    try:
        with gate.host(job.url):
            try:
                source, resolve_tries = with_retries(lambda: resolve(job.url, cfg), cfg, gate)
            except DownloadFailure as failure:
                tries = failure.attempts  # type: ignore[attr-defined]
                return results + [(position, Outcome(FAILED, _failure_reason(failure, tries), attempts=tries))
                                  for position, _ in todo]
            while todo:
                position, row = todo[0]
                extra = resolve_tries - 1
                resolve_tries = 1
                try:
                    (path, seconds), tries = with_retries(lambda: save_segment(source, row, cfg), cfg, gate)
                    outcome = Outcome(OK, "", seconds, path, tries + extra)
                except DownloadFailure as failure:
                    tries = failure.attempts + extra  # type: ignore[attr-defined]
                    outcome = Outcome(FAILED, _failure_reason(failure, tries), attempts=tries)
                results.append((position, outcome))
                todo.pop(0)
    except (Interrupted, InterruptedError):
        results += [(position, Outcome(FAILED, "interrupted")) for position, _ in todo]
    return results


# --------------------------------------------------------------------------- the stage

def _record(row: ClipRow | BadRow, url_template: str = "", url: str = "",
            outcome: Outcome | None = None) -> dict[str, Any]:
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


def remove_unlisted_clips(out_dir: Path, clip_ids: set[str] | dict[str, int]) -> int:
    """Clips of rows no longer in the CSV selection (e.g. a smaller ``limit``): data/clips
    holds exactly the manifest's clips, so DVC tracks what the params say."""
    removed = 0
    for path in out_dir.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.stem not in clip_ids:
            path.unlink()
            removed += 1
    return removed


def _csv_rows(csv_path: str | Path, limit: int | None) -> Iterator[ClipRow | BadRow]:
    for count, row in enumerate(iter_csv(csv_path)):
        if limit is not None and count >= limit:
            return
        yield row


def _count_lines(csv_path: str | Path, limit: int | None) -> int:
    """For the progress bar only: lines in the file (blank ones too), read in 1 MB blocks."""
    with open(csv_path, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return min(lines, limit) if limit is not None else lines


class _ManifestOut:
    """Records arrive in any order, leave for the manifest in CSV order (a reorder buffer)."""

    def __init__(self, add: Callable[[dict[str, Any]], None], root: str | Path,
                 on_record: Callable[[dict[str, Any]], None] | None, bar) -> None:
        self.add, self.on_record, self.bar = add, on_record, bar
        self.root = root
        root_text = Path(root).resolve().as_posix()
        self.root_forms = [quote(root_text), root_text] if root_text != "/" else []
        self.waiting: dict[int, dict[str, Any]] = {}
        self.next_position = 0
        self.summary = StageSummary("download")
        self.availability = Availability()

    def put(self, position: int, record: dict[str, Any]) -> None:
        self.waiting[position] = record
        while self.next_position in self.waiting:
            self._write(self.waiting.pop(self.next_position))
            self.next_position += 1

    def _write(self, record: dict[str, Any]) -> None:
        for form in self.root_forms:  # error messages may quote the source's full path
            record["reason"] = record["reason"].replace(form, "{root}")
        status, reason = record["status"], record["reason"]
        if status == OK and record["reused"]:
            self.summary.reuse()
        elif status == OK:
            self.summary.ok()
        else:
            self.summary.skip(reason_code(reason))
        self.availability.add(record["youtube_id"], status, reason, record["attempts"])
        if self.on_record is not None:
            self.on_record(dict(record))
        record["path"] = _relative_to(record["path"], self.root)
        self.add({column: record[column] for column in MANIFEST_COLUMNS})
        self.bar.update(1)


def download_rows(csv_path: str | Path, out_dir: str | Path, manifest_path: str | Path, url_template: str,
                  root: str | Path, allow_file_urls: bool, limit: int | None, workers: int, retries: int,
                  backoff_seconds: float, timeout_seconds: float, min_seconds: float,
                  format_selector: str = DEFAULT_FORMAT, cookies: str | Path | None = None,
                  sleep_seconds: float = 0.0, max_seconds: float = 60.0, requests_per_second: float = 0.0,
                  per_host: int = 4, pause_seconds: float = 30.0,
                  on_record: Callable[[dict[str, Any]], None] | None = None, group_videos: bool = True) -> None:
    """Download every row's segment and write the manifest (``MANIFEST_COLUMNS``, one row per
    CSV row, in CSV order). No row can stop it: each ends in the manifest with a status and a
    reason, even an unforeseen error (``internal_error``).

    ``cookies``: a Netscape cookies.txt sent with every request (YouTube's bot check, age gate);
    ``sleep_seconds``: each worker's pause before a download and between extraction requests;
    ``max_seconds``: longer segments are not downloaded (``too_long``); ``requests_per_second``,
    ``per_host``, ``pause_seconds``: the ``RequestGate``. ``on_record`` gets every row's record
    (with ``RUN_COLUMNS``) as it is written; ``group_videos=False`` resolves every row on its own
    (the behaviour before video jobs; for benchmarks/bench_download.py).
    """
    out_dir, manifest_path = Path(out_dir), Path(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # work folders of a killed run
    for stale in manifest_path.parent.glob(f".tmp-{manifest_path.stem}-*"):
        stale.unlink(missing_ok=True)
    cfg = FetchSettings(out_dir, allow_file_urls, retries, backoff_seconds, timeout_seconds,
                        min_seconds, format_selector,
                        read_cookies(cookies) if cookies is not None else None, sleep_seconds)
    gate = RequestGate(requests_per_second, per_host, pause_seconds)
    first_line: dict[str, int] = {}   # clip id -> line of its first row (duplicates)
    bound = max_rows_pending(workers)
    running: dict[Future, VideoJob] = {}
    finished_jobs: queue.SimpleQueue[Future] = queue.SimpleQueue()
    job: VideoJob | None = None

    with table_writer(manifest_path, MANIFEST_COLUMNS) as add, \
            ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(None, "download", total=_count_lines(csv_path, limit), unit="row") as bar:
        out = _ManifestOut(add, root, on_record, bar)

        def submit() -> None:
            nonlocal job
            if job is not None and job.segments:
                future = pool.submit(download_video, job, cfg, gate)
                running[future] = job
                future.add_done_callback(finished_jobs.put)
            job = None

        def collect(block: bool) -> None:
            """Write the outcomes of finished video jobs (waiting for one when ``block``)."""
            done = [finished_jobs.get()] if block else []
            while not finished_jobs.empty():
                done.append(finished_jobs.get())
            for future in done:
                finished = running.pop(future)
                try:
                    outcomes = future.result()
                except Exception as error:  # noqa: BLE001 - a bug for one video fails its rows only
                    detail = (str(error).strip().splitlines() or [""])[0][:160]
                    outcomes = [(position, Outcome(FAILED, f"internal_error: {type(error).__name__}: {detail}"))
                                for position, _ in finished.segments]
                rows = dict(finished.segments)
                for position, outcome in outcomes:
                    out.put(position, _record(rows[position], url_template, finished.url, outcome))

        try:
            for position, row in enumerate(_csv_rows(csv_path, limit)):
                if isinstance(row, BadRow):
                    out.put(position, _record(row))
                    continue
                url = build_url(url_template, row.youtube_id, root)
                refusal = _refusal(row, first_line, cfg, url, max_seconds)
                if refusal is not None:
                    out.put(position, _record(row, url_template, url, refusal))
                    continue
                if job is None or job.youtube_id != row.youtube_id or not group_videos or \
                        len(job.segments) >= MAX_SEGMENTS_PER_JOB:
                    submit()
                    job = VideoJob(row.youtube_id, url)
                job.segments.append((position, row))
                collect(block=False)
                while position + 1 - out.next_position >= bound:   # rows held between CSV and manifest
                    if not running:
                        submit()
                    collect(block=True)
            submit()
            while running:
                collect(block=True)
        except BaseException:  # Ctrl-C: no queued video starts, no retry follows, no manifest
            gate.stop.set()
            for future in running:
                future.cancel()
            raise
    remove_unlisted_clips(out_dir, first_line)
    for line in availability_lines(out.availability.stats()):  # before the summary: it stays last
        print(line, flush=True)
    if gate.pauses:
        print(f"download: the site refused this machine (HTTP 429 / bot check): every worker paused "
              f"{gate.pauses}x, {gate.paused_seconds:.1f} s in all", flush=True)
    out.summary.print()


def _refusal(row: ClipRow, first_line: dict[str, int], cfg: FetchSettings, url: str,
             max_seconds: float) -> Outcome | None:
    """Why a row is not fetched at all (no request), or None; records a fetched row's clip id."""
    if row.clip_id in first_line:
        return Outcome(SKIPPED, f"duplicate_segment: same segment as line {first_line[row.clip_id]}")
    if row.duration > max_seconds:
        return Outcome(FAILED, f"too_long: segment is {row.duration:.2f} s, max_seconds is {max_seconds:g}")
    first_line[row.clip_id] = row.line
    if row.duration < cfg.min_seconds:
        return Outcome(FAILED, f"too_short: segment is {row.duration:.2f} s, min_seconds is {cfg.min_seconds:g}")
    if is_file_url(url) and not cfg.allow_file_urls:
        return Outcome(FAILED, "file_urls_disabled: set download.allow_file_urls to use file:// URLs")
    return None


def run_download(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """``download_rows``, with every row's record returned as a table (``MANIFEST_COLUMNS`` +
    ``RUN_COLUMNS``): for small CSVs (tests, notebooks); the stage keeps no rows."""
    records: list[dict[str, Any]] = []
    download_rows(*args, on_record=records.append, **kwargs)
    return pd.DataFrame(records, columns=MANIFEST_COLUMNS + RUN_COLUMNS)


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
    requests_per_second: float = setting(0.0, minimum=0.0)  # all workers together; 0 = no limit
    per_host: int = setting(4, minimum=1)                   # videos of one host worked on at once
    pause_seconds: float = setting(30.0, minimum=0.0, maximum=3600.0)  # every worker's pause after a 429 / bot check

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
                   root: str | Path) -> None:
    """``download_rows`` with the settings of the ``download`` section (no rows kept)."""
    cookies = str(Path(config.cookies).expanduser()) if config.cookies is not None else None
    download_rows(config.csv, out_dir, manifest_path, config.url_template, root, config.allow_file_urls,
                  config.limit, config.workers, config.retries, config.backoff_seconds,
                  config.timeout_seconds, config.min_seconds, config.format, cookies=cookies,
                  sleep_seconds=config.sleep_seconds, max_seconds=config.max_seconds,
                  requests_per_second=config.requests_per_second, per_host=config.per_host,
                  pause_seconds=config.pause_seconds)
