"""AVSpeech CSV parsing: good rows, and every bad row kept with its reason."""

from __future__ import annotations

from pathlib import Path

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
