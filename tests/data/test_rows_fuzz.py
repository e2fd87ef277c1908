"""Property tests: no CSV content can stop the download stage.

Hypothesis writes rows a hostile or careless user could: numbers that are inf, nan, huge or
negative, very long and non-ASCII ids, ids with path and shell characters, missing and extra
fields, stray quotes, a header, blank lines, CRLF, a BOM, duplicates. Whatever it writes:
no exception, one manifest line per non-blank CSV line, every line with a status and a
reason, and no file outside the stage's output folders.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speech2face.core.fsutil import is_safe_id
from speech2face.core.tables import read_table
from speech2face.data.avspeech import BadRow, ClipRow, parse_row, read_csv
from speech2face.data.download import run_download

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**400, 10**400).map(str),
    st.sampled_from(["inf", "-inf", "nan", "1e306", "1e-320", "0x10", "1_000", " 3 ", "", "٣"]),
    st.floats(0, 20).map(lambda v: f"{v:.3f}"))
IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,80}", fullmatch=True),
    st.text(max_size=90),
    st.sampled_from(["vid0", "-vid0", "../evil", "$(id)", "a;touch x", "`id`", "/etc/passwd", "..", "a b",
                     "\ufeffvid0", "vid0\n", ""]))
FIELD = st.one_of(NUMBERS, IDS, st.text(alphabet=',"\r\n\t \x00', max_size=4))
ROW = st.one_of(
    st.tuples(IDS, NUMBERS, NUMBERS, NUMBERS, NUMBERS).map(list),
    st.lists(FIELD, max_size=8))
LINE_END = st.sampled_from(["\n", "\r\n"])


def _line(fields: list[str]) -> str:
    return ",".join(fields)


@settings(max_examples=400, deadline=None)
@given(ROW)
def test_parse_row_never_raises(fields: list[str]) -> None:
    row = parse_row(7, fields)
    assert isinstance(row, (ClipRow, BadRow)) and row.line == 7
    if isinstance(row, ClipRow):
        assert is_safe_id(row.clip_id) and len(row.clip_id) <= 64 + 18
        assert 0 <= row.start < row.end <= 24 * 3600 and 0 <= row.x <= 1 and 0 <= row.y <= 1
    else:
        assert row.reason.split(":")[0] in {"malformed_row", "unsafe_id", "bad_segment", "bad_face_centre"}


def _csv_text(rows: list[list[str]], ends: list[str], header: bool, bom: bool, blanks: list[int]) -> str:
    lines = [_line(fields) for fields in rows]
    if header:
        lines.insert(0, "youtube_id,start,end,x,y")
    for position in blanks:
        lines.insert(min(position, len(lines)), "")
    text = "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    return ("\ufeff" if bom else "") + text


def _non_blank_lines(path: Path) -> int:
    """The lines with content, as a text reader of the file sees them (the stage's rule)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    count = 0
    for line in io.StringIO(text, newline=""):
        if line.rstrip("\r\n").strip(" \t,\ufeff"):
            count += 1
    return count


CSV_FILES = st.builds(_csv_text, st.lists(ROW, max_size=12), st.lists(LINE_END, min_size=1, max_size=3),
                      st.booleans(), st.booleans(), st.lists(st.integers(0, 12), max_size=3))


@settings(max_examples=300, deadline=None)
@given(CSV_FILES)
def test_every_non_blank_line_is_one_row(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.csv"
        path.write_text(text, encoding="utf-8", errors="surrogatepass", newline="")
        rows = read_csv(path)
        assert len(rows) == _non_blank_lines(path)
        assert [row.line for row in rows] == sorted(row.line for row in rows)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """vid0.mp4 and -vid0.mp4: 4 s of test pattern with sound, for the rows that name them."""
    folder = tmp_path_factory.mktemp("videos")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=4",
                    "-f", "lavfi", "-i", "sine=frequency=440:duration=4", "-c:v", "libx264", "-preset",
                    "ultrafast", "-c:a", "aac", "-shortest", str(folder / "vid0.mp4")], check=True)
    os.link(folder / "vid0.mp4", folder / "-vid0.mp4")
    return folder


def _files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(CSV_FILES)
@example("vid0,0.5,3.0,0.5,0.5\r\n-vid0,0.5,3.0,0.5,0.5\nvid0,0.5,3.0,0.5,0.5\nvid0,0,1e306,0.5,0.5\n")
def test_a_whole_download_run_records_every_line(video_folder: Path, text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "project"
        (root / "videos").mkdir(parents=True)
        for video in video_folder.iterdir():
            os.link(video, root / "videos" / video.name)
        csv_path = root / "rows.csv"
        csv_path.write_text(text, encoding="utf-8", errors="surrogatepass", newline="")
        before = _files_under(Path(folder))
        with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()):
            manifest = run_download(csv_path, root / "clips", root / "manifests" / "download.csv",
                                    "file://{root}/videos/{id}.mp4", root, allow_file_urls=True, limit=None,
                                    workers=2, retries=0, backoff_seconds=0.0, timeout_seconds=10.0,
                                    min_seconds=1.0)
        written = read_table(root / "manifests" / "download.csv")
        lines = _non_blank_lines(csv_path)
        assert len(manifest) == len(written) == lines
        assert written["status"].isin(["ok", "skipped", "failed"]).all()
        assert (written.loc[written["status"] != "ok", "reason"].str.len() > 0).all()
        created = _files_under(Path(folder)) - before
        assert all(path.parts[1] in ("clips", "manifests") for path in created), created
        for clip in (root / "clips").iterdir():   # only complete clips of listed rows remain
            assert clip.stem in set(written.loc[written["status"] == "ok", "clip_id"])
        if text.startswith("vid0,0.5,3.0"):   # the explicit example: real clips, a '-' id, a duplicate
            assert list(written["status"]) == ["ok", "ok", "skipped", "skipped"]
            assert sorted(p.name for p in (root / "clips").iterdir()) == [
                "-vid0_00000500_00003000.mp4", "vid0_00000500_00003000.mp4"]
