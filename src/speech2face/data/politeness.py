"""What every download worker asks before it sends a request to a site.

At AVSpeech scale the site's patience is the scarce resource: YouTube answers too many
requests with HTTP 429 or a bot check, and keeps refusing a machine that goes on asking.
``RequestGate`` keeps all workers of one run polite together:

- **per-host concurrency**: at most ``per_host`` videos of one host are worked on at once
  (the thread pool may be larger: other hosts, local files);
- **global request rate**: requests start at least ``1 / requests_per_second`` apart,
  across all workers (0 = no limit);
- **a pause for everyone**: when a site says "too many requests" or asks for a bot check,
  no worker starts a request until the pause is over. The pause doubles with each block
  that follows the end of the previous pause, up to ``MAX_PAUSE_SECONDS``, and resets on the
  next success. The refused request is then retried (it counts against ``retries``), so a
  short block loses nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator
from urllib.parse import urlparse

MAX_PAUSE_SECONDS = 3600.0   # YouTube's blocks last up to an hour


def host_of(url: str) -> str:
    """The host a URL's requests go to; all local files count as one host."""
    parsed = urlparse(url)
    return "file" if parsed.scheme.lower() == "file" else (parsed.hostname or "")


class RequestGate:
    def __init__(self, requests_per_second: float = 0.0, per_host: int = 4, pause_seconds: float = 30.0,
                 stop: threading.Event | None = None):
        self.interval = 1.0 / requests_per_second if requests_per_second > 0 else 0.0
        self.per_host = per_host
        self.pause_seconds = pause_seconds
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._next_start = 0.0      # monotonic time the next request may start (rate limit)
        self._resume_at = 0.0       # monotonic end of the current pause
        self._blocks = 0            # blocks in a row, for the doubling
        self.pauses = 0             # pauses started in this run, and their seconds (reported by the stage)
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def host(self, url: str) -> Iterator[None]:
        """Hold one of the host's ``per_host`` slots for the block (a whole video)."""
        with self._lock:
            slot = self._hosts.setdefault(host_of(url), threading.BoundedSemaphore(self.per_host))
        while not slot.acquire(timeout=0.1):
            if self.stop.is_set():
                raise InterruptedError("stopped while waiting for a host slot")
        try:
            yield
        finally:
            slot.release()

    def before_request(self) -> bool:
        """Wait for the pause to end and for this request's turn; False if the run is stopping."""
        while True:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start, self._resume_at)
                if start <= now:
                    self._next_start = now + self.interval
                    return True
            if self.stop.wait(min(start - now, 1.0)):
                return False

    def blocked(self) -> float:
        """The site refused this machine: pause every worker. Returns the pause's length."""
        with self._lock:
            now = time.monotonic()
            if now < self._resume_at:            # a block seen by another worker already started the pause
                return self._resume_at - now
            self._blocks += 1
            seconds = min(self.pause_seconds * 2 ** (self._blocks - 1), MAX_PAUSE_SECONDS)
            self._resume_at = now + seconds
            self.pauses += 1
            self.paused_seconds += seconds
            return seconds

    def succeeded(self) -> None:
        with self._lock:
            self._blocks = 0
