"""AVSpeech-format CSV: ``youtube_id,start,end,x,y`` with no header.

x, y are the face centre as fractions of the frame width and height. Malformed rows are
returned as problems (line number and reason), never raised, so one bad row cannot stop
a stage: a line is parsed on its own (a stray quote or an oversized field spoils only that
line), lines longer than ``MAX_LINE_CHARS`` are not read into memory, and times past
``MAX_VIDEO_SECONDS`` are refused before they can make an absurd clip id.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from speech2face.core.fsutil import is_safe_id

MAX_LINE_CHARS = 1000           # an AVSpeech line is about 50 characters
MAX_VIDEO_SECONDS = 24 * 3600   # YouTube's longest videos are 12 h


@dataclass(frozen=True)
class ClipRow:
    line: int            # 1-based line number in the CSV
    youtube_id: str
    start: float         # seconds
    end: float
    x: float             # face centre, fraction of frame width
    y: float

    @property
    def clip_id(self) -> str:
        """Unique per segment; only [A-Za-z0-9_-], so it is a safe file name."""
        return f"{self.youtube_id}_{round(self.start * 1000):08d}_{round(self.end * 1000):08d}"

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class BadRow:
    line: int
    raw: str
    reason: str
    youtube_id: str = ""  # the first field as written (may be hostile: never used as a path)


def parse_row(line: int, fields: list[str]) -> ClipRow | BadRow:
    raw = ",".join(fields)
    yid = fields[0].strip() if fields else ""

    def bad(reason: str) -> BadRow:
        return BadRow(line, raw, reason, yid)

    if len(fields) != 5:
        return bad(f"malformed_row: expected 5 fields, got {len(fields)}")
    if not is_safe_id(yid):
        return bad("unsafe_id: only letters, digits, '-' and '_' allowed")
    try:
        start, end, x, y = (float(v) for v in fields[1:])
    except ValueError:
        return bad("malformed_row: start/end/x/y not numbers")
    if not all(math.isfinite(v) for v in (start, end, x, y)):
        return bad("malformed_row: non-finite number")
    if start < 0 or end <= start:
        return bad("bad_segment: need 0 <= start < end")
    if end > MAX_VIDEO_SECONDS:
        return bad(f"bad_segment: end beyond {MAX_VIDEO_SECONDS // 3600} h")
    if not (0 <= x <= 1 and 0 <= y <= 1):
        return bad("bad_face_centre: x, y must be fractions in [0, 1]")
    return ClipRow(line, yid, start, end, x, y)


def read_csv(path: str | Path, limit: int | None = None) -> list[ClipRow | BadRow]:
    """Rows in file order (first ``limit`` non-empty lines when given)."""
    rows: list[ClipRow | BadRow] = []
    for row in iter_csv(path):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(row)
    return rows


def iter_csv(path: str | Path) -> Iterator[ClipRow | BadRow]:
    """Every non-blank line as a row, in order; never raises for the content."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        line = 0
        while True:
            text = f.readline(MAX_LINE_CHARS + 1)
            if not text:
                return
            line += 1
            if len(text) > MAX_LINE_CHARS and not text.endswith("\n"):
                while text and not text.endswith("\n"):   # skip the rest of the line, a chunk at a time
                    text = f.readline(1 << 16)
                yield BadRow(line, "", f"malformed_row: line longer than {MAX_LINE_CHARS} characters")
                continue
            text = text.rstrip("\r\n")
            if not text.strip(" \t,\ufeff"):
                continue
            try:
                fields = next(csv.reader([text]))
            except (csv.Error, StopIteration) as error:
                yield BadRow(line, text, f"malformed_row: {error}")
                continue
            yield parse_row(line, fields)
