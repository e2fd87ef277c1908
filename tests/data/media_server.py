"""A local HTTP server for the download stage's tests (real yt-dlp, real ffmpeg).

The server (127.0.0.1, random port) logs every request, answers Range requests, and can
misbehave on purpose, chosen by the first path segment:
  /v/<id>.mp4         normal
  /slow/<id>.mp4      throttled body
  /drop-<k>/<id>.mp4  during the first k attempts, every Range read is cut off after a fifth of its body (RST)
  /err503-<k>/<id>.mp4  the first k attempts get HTTP 503
  /err429-<k>/<id>.mp4  the first k attempts get HTTP 429 (a rate limit)
  /stall-<k>/<id>.mp4   during the first k attempts, Range reads get no answer for 5 s
  /limit-<k>/<id>.mp4   the first k page/metadata GETs of the whole server get HTTP 429
An "attempt" is counted from the log. yt-dlp's generic extractor resolves a video with one GET
without a Range header (the page/metadata request, once per video); ffmpeg's and ffprobe's
reads always carry one, and each of their opens of the file starts with "bytes=0-". So for the
err* modes an attempt is a resolution (``attempts``), for drop/stall an open (``opens``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pandas as pd

from speech2face.core.tables import read_table
from speech2face.data.download import run_download

FPS = 25
SIZE = (160, 120)


def make_test_video(path: Path) -> Path:
    """10 s of video whose frames carry their own number + a sine, H.264 with a keyframe every
    2 s, so a cut that snapped to a keyframe would start at 0, 2, 4... s and be caught.

    Frame N is two flat grey halves, luma 16 * (N mod 16) + 8 on the left and
    16 * (N // 16) + 8 on the right: lossy re-encoding moves a level by a few units, never
    by 8, so every frame of a clip reads back as exactly one source frame number."""
    numbered = (f"nullsrc=size={SIZE[0]}x{SIZE[1]}:rate={FPS}:duration=10,"
                f"geq=lum='if(lt(X,{SIZE[0] // 2}),16*mod(N,16)+8,16*floor(N/16)+8)':cb=128:cr=128")
    subprocess.run(["ffmpeg", "-v", "error", "-y",
                    "-f", "lavfi", "-i", numbered,
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=10",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * FPS), "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", "-shortest", str(path)],
                   check=True)
    return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "MediaServer"

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        mode, name = (parts[0], parts[-1]) if len(parts) == 2 else ("", "")
        has_range = self.headers.get("Range") is not None
        attempt = self.server.record(self.command, self.path, has_range,
                                     opens=(self.headers.get("Range") or "").replace(" ", "") == "bytes=0-")
        self.server.cookies.append((self.path, has_range, self.headers.get("Cookie")))
        data = self.server.videos.get(name[:-4]) if name.endswith(".mp4") else None
        if data is None or not re.fullmatch(r"v|slow|(drop|err503|err429|stall|limit)-\d+", mode):
            return self._empty(404)
        if mode.startswith("limit-") and not has_range and self.server.resolutions() <= int(mode.split("-")[1]):
            return self._empty(429)
        if mode.startswith("stall-") and has_range and attempt <= int(mode.split("-")[1]):
            time.sleep(5)
            return self._empty(503)
        for status in (503, 429):
            if mode.startswith(f"err{status}-") and not has_range and attempt <= int(mode.split("-")[1]):
                return self._empty(status)
        start, end = 0, len(data) - 1
        if has_range:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers["Range"].strip())
            if match and match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), end) if match.group(2) else end
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not body:
            return
        chunk = data[start:end + 1]
        try:
            if mode.startswith("drop-") and has_range and attempt <= int(mode.split("-")[1]):
                self.wfile.write(chunk[: len(chunk) // 5])  # the moov atom (at the front) and ~2 s of media
                self.wfile.flush()
                self.server.record("DROPPED", self.path, has_range)
                # SO_LINGER 0: close with a TCP reset, like a peer that went away
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            elif mode == "slow":
                for i in range(0, len(chunk), 8192):  # ~400 kB/s: a clip takes a few tenths of a second
                    self.wfile.write(chunk[i:i + 8192])
                    time.sleep(0.02)
            else:
                self.wfile.write(chunk)
        except OSError:  # the client went away (killed, or done reading)
            self.close_connection = True

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, videos: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.videos = videos
        self.log: list[tuple[float, str, str, bool]] = []  # (time, method, path, has Range)
        self.open_log: list[tuple[float, str]] = []        # (time, path) of every "bytes=0-" read
        self.cookies: list[tuple[str, bool, str | None]] = []  # (path, has Range, Cookie header)
        self._lock = threading.Lock()

    def record(self, method: str, path: str, has_range: bool, opens: bool = False) -> int:
        """Log a request; returns the attempt number it belongs to (see the module doc)."""
        with self._lock:
            self.log.append((time.monotonic(), method, path, has_range))
            if opens and method == "GET":
                self.open_log.append((time.monotonic(), path))
            return self.opens(path) if has_range else self.attempts(path)

    def resolutions(self) -> int:
        """Page/metadata GETs so far, of every video."""
        return sum(1 for _, method, _, has_range in self.log if method == "GET" and not has_range)

    def attempts(self, path: str) -> int:
        """Resolutions: yt-dlp's page/metadata GETs (no Range header)."""
        return sum(1 for _, method, p, has_range in self.log if p == path and method == "GET" and not has_range)

    def opens(self, path: str) -> int:
        """ffmpeg's and ffprobe's opens of the media (a read from byte 0)."""
        return sum(1 for _, p in self.open_log if p == path)

    def requests(self, path: str) -> list[tuple[float, str, str, bool]]:
        return [entry for entry in self.log if entry[2] == path]

    def template(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/{{id}}.mp4"

    def handle_error(self, request, client_address) -> None:  # dropped sockets are on purpose
        pass


@contextlib.contextmanager
def serving(videos: dict[str, bytes]) -> Iterator[MediaServer]:
    server = MediaServer(videos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run_table(tmp_path: Path, csv_lines: list[str], url_template: str, **overrides) -> pd.DataFrame:
    """``run_download`` on these CSV lines in ``tmp_path``; the returned table (indexed by line)
    is checked against the manifest written to disk."""
    args = dict(csv_path=write_csv(tmp_path / "rows.csv", csv_lines), out_dir=tmp_path / "clips",
                manifest_path=tmp_path / "manifests" / "download.csv", url_template=url_template,
                root=tmp_path, allow_file_urls=False, limit=None, workers=2, retries=2,
                backoff_seconds=0.05, timeout_seconds=5.0, min_seconds=1.0, pause_seconds=0.05)
    args.update(overrides)
    manifest = run_download(**args)
    written = read_table(args["manifest_path"])
    assert list(written.columns[:12]) == ["line", "youtube_id", "start", "end", "x", "y", "clip_id", "url",
                                          "status", "reason", "duration", "path"]
    assert list(written["status"]) == list(manifest["status"]) and list(written["reason"]) == list(manifest["reason"])
    return manifest.set_index("line", drop=False)
