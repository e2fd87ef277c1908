"""AVSpeech-format CSV: ``youtube_id,start,end,x,y`` with no header.

x, y are the face centre as fractions of the frame width and height. Malformed rows are
returned as problems (line number and reason), never raised, so one bad row cannot stop
a stage.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from speech2face.core.fsutil import is_safe_id


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
    if not (0 <= x <= 1 and 0 <= y <= 1):
        return bad("bad_face_centre: x, y must be fractions in [0, 1]")
    return ClipRow(line, yid, start, end, x, y)


def read_csv(path: str | Path, limit: int | None = None) -> list[ClipRow | BadRow]:
    """Rows in file order (first ``limit`` non-empty lines when given)."""
    rows: list[ClipRow | BadRow] = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for line, fields in enumerate(csv.reader(f), start=1):
            if not fields or all(not v.strip() for v in fields):
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append(parse_row(line, fields))
    return rows
