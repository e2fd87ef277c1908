"""AVSpeech CSV parsing: good rows, and every bad row kept with its reason."""

from __future__ import annotations

from pathlib import Path

from speech2face.core.fsutil import is_safe_id
from speech2face.data.avspeech import BadRow, ClipRow, read_csv


def test_rows_and_bad_rows(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "AvWWVOgaMlk,90.000000,93.566667,0.5578125,0.2794444\n"
        "\n"
        '"$(touch pwned);echo ""x"",y",1,4,0.5,0.5\n'
        "short,1,2\n"
        "abc,5,3,0.5,0.5\n"
        "abc,1,3,1.5,0.5\n"
        "abc,1,x,0.5,0.5\n"
        "abc,nan,3,0.5,0.5\n")
    rows = read_csv(csv)
    good = rows[0]
    assert isinstance(good, ClipRow) and good.clip_id == "AvWWVOgaMlk_00090000_00093567"
    assert abs(good.duration - 3.566667) < 1e-9
    bad = rows[1:]
    assert all(isinstance(r, BadRow) for r in bad)
    assert [r.line for r in bad] == [3, 4, 5, 6, 7, 8]  # the blank line 2 is not a row
    assert bad[0].youtube_id == '$(touch pwned);echo "x",y' and bad[0].reason.startswith("unsafe_id")
    assert [r.reason.split(":")[0] for r in bad[1:]] == [
        "malformed_row", "bad_segment", "bad_face_centre", "malformed_row", "malformed_row"]
    assert len(read_csv(csv, limit=2)) == 2


def test_rows_that_used_to_stop_the_stage_are_recorded(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    long_id = "a" * 65
    csv.write_bytes((
        "\ufeffyoutube_id,start,end,x,y\r\n"        # a header, with a BOM, CRLF line ends
        "bbaf2n,0,1e306,0.5,0.5\r\n"                # float overflow in the clip id
        "bbaf2n,0,1e250,0.5,0.5\n"                  # a 267-character clip id
        "-AbC_dEf-12,1,3.5,0.5,0.5\n"               # a real-looking id with a leading '-'
        f"{long_id},1,3,0.5,0.5\n"
        "abc\n,1,3,0.5,0.5\n"                       # an id with a newline: two bad lines
        "caf\u00e9,1,3,0.5,0.5\n"
        '"un"quoted,1,3,0.5,0.5\n'                 # CSV reads this id as 'unquoted'
        + "x," * 5000 + "\n"                        # a 10,000-character line
        "abc,1,3,0.5,0.5,extra\n"
        "ok_after,1,3,0.5,0.5\n").encode())
    rows = read_csv(csv)
    by_line = {row.line: row for row in rows}
    assert [row.line for row in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    reason = {line: getattr(row, "reason", "ok").split(":")[0] for line, row in by_line.items()}
    assert reason == {1: "unsafe_id", 2: "bad_segment", 3: "bad_segment", 4: "ok", 5: "unsafe_id",
                      6: "malformed_row", 7: "unsafe_id", 8: "unsafe_id", 9: "ok",
                      10: "malformed_row", 11: "malformed_row", 12: "ok"}
    assert by_line[4].clip_id == "-AbC_dEf-12_00001000_00003500"
    assert "longer than 1000 characters" in by_line[10].reason


def test_safe_ids_are_matched_whole() -> None:
    assert is_safe_id("-AbC_dEf-12") and is_safe_id("a" * 64)
    for bad in ("abc\n", "abc\r", "a" * 65, "", "a.b", "a/b", " abc", "caf\u00e9", "abc\x00"):
        assert not is_safe_id(bad), repr(bad)
