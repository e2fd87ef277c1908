"""Download stage with real yt-dlp and real ffmpeg against a local HTTP server (media_server.py,
its behaviours and how it counts requests) and file:// URLs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import yt_dlp
from media_server import FPS, SIZE, MediaServer, run_table, write_csv
from yt_dlp.extractor.youtube import YoutubeIE

from speech2face.core.params import ParamsError, build_config
from speech2face.core.tables import read_table, write_table
from speech2face.data.download import DownloadConfig, read_cookies
from speech2face.data.download_errors import availability, availability_lines, classify_error
from speech2face.data.media import probe

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "stages" / "download.py"
CREMAD = ROOT.parent / "shared" / "media" / "av" / "cremad"


# --------------------------------------------------------------------------- helpers

def _frame_numbers(path: Path) -> list[int]:
    """The source frame number of every decoded frame of a clip of ``test_video``, read from
    the luma plane (no range conversion) in the middle of each half."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
                         check=True, capture_output=True).stdout
    width, height = SIZE
    frames = np.frombuffer(raw, np.uint8).reshape(-1, width * height * 3 // 2)[:, :width * height]
    luma = frames.reshape(-1, height, width).astype(np.float64)
    quarter = width // 4
    low = np.rint((luma[:, :, quarter // 2:quarter + quarter // 2].mean(axis=(1, 2)) - 8) / 16)
    high = np.rint((luma[:, :, 2 * quarter + quarter // 2:3 * quarter + quarter // 2].mean(axis=(1, 2)) - 8) / 16)
    return [int(n) for n in low + 16 * high]


def _codecs(path: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return sorted(out.split())


def _video_packets(path: Path) -> int:
    """Packets stored, not frames shown: a stream copy keeps the packets back to the previous
    keyframe and hides them behind an edit list, which decoding alone would not reveal."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets",
                          "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def _final_clips(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


# --------------------------------------------------------------------------- tests

def test_http_section_cut_is_exact(media_server: MediaServer, test_video: Path, tmp_path: Path) -> None:
    m = run_table(tmp_path, ["vid0,1.6,5.0,0.5,0.5",     # inside: cut exactly
                        "vid1,12.0,14.0,0.5,0.5",   # starts after the 10 s video ends
                        "vid2,8.0,11.0,0.5,0.5",    # runs past the end
                        "vid3,2.0,2.6,0.5,0.5"],    # shorter than min_seconds
             media_server.template("v"), retries=2)
    row = m.loc[1]
    assert (row.status, row.reason, row.attempts) == ("ok", "", 1)
    clip = Path(row.path)
    assert clip == tmp_path / "clips" / "vid0_00001600_00005000.mp4" and row.clip_id == clip.stem
    measured = probe(clip).duration
    assert abs(measured - 3.4) < 0.15 and row.duration == pytest.approx(measured, abs=1e-3)
    assert _codecs(clip) == ["aac", "h264"]
    # Frame-exact: the clip holds exactly the source frames that start in [1.6 s, 5.0 s),
    # each once (not from the keyframe at 0 or 2 s that a stream copy would start from).
    assert _frame_numbers(clip) == list(range(round(1.6 * FPS), round(5.0 * FPS)))
    assert _video_packets(clip) == round(3.4 * FPS)

    for line in (2, 3):  # permanent: one attempt, the reason names the video's length
        assert m.loc[line, "status"] == "failed" and m.loc[line, "attempts"] == 1
        assert m.loc[line, "reason"].startswith("segment_outside_video") and "video is 10.00 s" in m.loc[line, "reason"]
    assert (m.loc[4, "status"], m.loc[4, "reason"].split(":")[0]) == ("failed", "too_short")
    assert media_server.requests("/v/vid3.mp4") == []  # too short: never fetched
    assert sorted(_final_clips(tmp_path / "clips")) == ["vid0_00001600_00005000"]
    assert not list((tmp_path / "clips").glob(".tmp-*"))


def test_clips_and_manifest_are_byte_identical_across_runs(media_server: MediaServer, test_video: Path,
                                                           tmp_path: Path) -> None:
    """The same rows give the same bytes in another folder and another run, on both paths
    (yt-dlp's http section download and the file:// cut): DVC hashes, hence every later
    stage, depend on it."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "vid0.mp4").symlink_to(test_video)
    (videos / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64)  # corrupt
    rows = ["vid0,1.6,5.0,0.5,0.5", "vid0,5.2,8.0,0.5,0.5", "bad,1.0,3.0,0.5,0.5"]
    digests = []
    for run, (template, file_urls) in enumerate([(media_server.template("v"), False)] * 2 +
                                                [("file://{root}/videos/{id}.mp4", True)] * 2):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        m = run_table(folder, rows, template, root=tmp_path, allow_file_urls=file_urls)
        assert list(m["status"]) == ["ok", "ok", "failed"]
        # the failure's message names no random temp folder (the file:// path cuts in one)
        assert ".tmp-" not in m.loc[3, "reason"], m.loc[3, "reason"]
        digests.append([hashlib.md5(Path(p).read_bytes()).hexdigest() for p in m["path"] if p]
                       + [(folder / "manifests" / "download.csv").read_text().replace(f"run{run}/", "")])
    assert "run0" not in digests[0][-1] and str(tmp_path) not in digests[0][-1]  # paths relative to the root
    assert digests[0] == digests[1] and digests[2] == digests[3]


def test_404_is_permanent_and_not_retried(media_server: MediaServer, tmp_path: Path) -> None:
    m = run_table(tmp_path, ["missing,1.0,3.0,0.5,0.5"], media_server.template("v"), retries=3)
    row = m.loc[1]
    assert row.status == "failed" and row.attempts == 1
    assert row.reason.startswith("http_404: ") and "404" in row.reason[len("http_404: "):]
    assert len(media_server.requests("/v/missing.mp4")) == 1
    assert _final_clips(tmp_path / "clips") == {}


def test_transient_errors_are_retried_with_backoff(media_server: MediaServer, tmp_path: Path) -> None:
    port = media_server.server_address[1]
    # the URL template is one per run: the server's behaviours are four small runs
    results = {}
    for mode, line in (("drop-1", "vid0,1.0,4.5,0.5,0.5"),     # first attempt's reads cut off
                       ("drop-99", "vid1,1.0,4.5,0.5,0.5"),    # cut off every time
                       ("err503-1", "vid2,1.0,4.5,0.5,0.5"),   # HTTP 503 once
                       ("stall-1", "vid3,1.0,4.5,0.5,0.5")):   # no answer, once
        folder = tmp_path / mode
        folder.mkdir()
        results[mode] = run_table(folder, [line], f"http://127.0.0.1:{port}/{mode}/{{id}}.mp4",
                             retries=2, backoff_seconds=0.2, timeout_seconds=1.0).loc[1]

    # A retry downloads the segment again from the video's one resolution: one metadata request
    ok = results["drop-1"]
    assert (ok.status, ok.attempts) == ("ok", 2) and abs(probe(Path(ok.path)).duration - 3.5) < 0.15
    log = media_server.requests("/drop-1/vid0.mp4")
    assert media_server.attempts("/drop-1/vid0.mp4") == 1 and any(entry[1] == "DROPPED" for entry in log)

    dead = results["drop-99"]
    path = "/drop-99/vid1.mp4"
    assert dead.status == "failed" and dead.attempts == 3 and media_server.attempts(path) == 1
    assert dead.reason.split(":")[0] in ("incomplete_clip", "ffmpeg_failed") and "(after 3 attempts)" in dead.reason
    # three downloads (and one ffprobe of the video's length, between the first two), 0.2 s,
    # then 0.4 s apart
    opens = [t for t, p in media_server.open_log if p == path]
    assert len(opens) == 4 and opens[-1] - opens[0] >= 0.6 and opens[-1] - opens[-2] >= 0.4
    assert _final_clips(tmp_path / "drop-99" / "clips") == {}

    flaky = results["err503-1"]  # the resolution itself failed once: it is retried
    assert (flaky.status, flaky.attempts) == ("ok", 2) and media_server.attempts("/err503-1/vid2.mp4") == 2

    stalled = results["stall-1"]  # timeout_seconds reaches ffmpeg's reads: no hang, a retry
    assert (stalled.status, stalled.attempts) == ("ok", 2) and media_server.attempts("/stall-1/vid3.mp4") == 1
    assert abs(probe(Path(stalled.path)).duration - 3.5) < 0.15


def test_kill_and_resume(media_server: MediaServer, tmp_path: Path) -> None:
    ids = [f"vid{i}" for i in range(6)]
    write_csv(tmp_path / "rows.csv", [f"{v},1.0,4.0,0.5,0.5" for v in ids])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": {
        "csv": "rows.csv", "limit": None, "url_template": media_server.template("slow"),
        "allow_file_urls": False, "workers": 2, "retries": 1, "backoff_seconds": 0.1,
        "timeout_seconds": 10, "min_seconds": 1.0}}))
    shutil.copy(ROOT / "dvc.yaml", tmp_path)   # the stage's paths
    clips = tmp_path / "data" / "clips"
    manifest_path = tmp_path / "data" / "manifests" / "download.csv"

    first = subprocess.Popen([sys.executable, str(STAGE)], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once a clip is finished while another is in flight: between two clips a worker holds no
    # temp folder (it is resolving the next video), so waiting for the first final name alone races
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if clips.is_dir() and _final_clips(clips) and list(clips.glob(".tmp-*")):
            break
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # (gone already: the assertion below says so)
        os.killpg(first.pid, signal.SIGKILL)  # the stage and its ffmpeg children, no clean-up
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not manifest_path.exists()

    finished = _final_clips(clips)
    assert 1 <= len(finished) < len(ids)
    for clip_id, path in finished.items():  # whatever carries a final name is complete
        assert abs(probe(path).duration - 3.0) < 0.15 and path.suffix == ".mp4"
    finished_ids = {clip_id.split("_")[0] for clip_id in finished}
    assert list(clips.glob(".tmp-*")), "the kill should have caught a download in flight"

    media_server.log.clear()
    second = subprocess.run([sys.executable, str(STAGE)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    summary = second.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"download: {len(ids) - len(finished)} done, {len(finished)} reused")
    for youtube_id in ids:
        fetched = media_server.requests(f"/slow/{youtube_id}.mp4")
        assert (fetched == []) == (youtube_id in finished_ids), youtube_id
    manifest = read_table(manifest_path)
    assert list(manifest["status"]) == ["ok"] * len(ids)
    assert set(manifest["reason"]) == {""}  # reused or not: the manifest is what the clips are, not their history
    assert sorted(_final_clips(clips)) == sorted(manifest["clip_id"])
    for path in manifest["path"]:
        assert abs(probe(tmp_path / path).duration - 3.0) < 0.15
    assert not list(clips.glob(".tmp-*")), "the rerun removes the killed run's temp folders"


def test_hostile_ids_are_rejected(tmp_path: Path, test_video: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a shell-interpreted id would touch files here
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "good.mp4").symlink_to(test_video)
    (tmp_path / "evil.mp4").symlink_to(test_video)  # what '../evil' would reach
    hostile = ["../evil", "a;touch x", "$(id)", "/etc/passwd", "..", "a b", "`id`", "a" * 65]
    before = sorted(p.relative_to(tmp_path.parent) for p in tmp_path.parent.rglob("*"))
    m = run_table(tmp_path, [f"{h},1.0,3.0,0.5,0.5" for h in hostile] + ["good,1.0,3.0,0.5,0.5"],
             "file://{root}/videos/{id}.mp4", allow_file_urls=True)
    for line, value in enumerate(hostile, start=1):
        row = m.loc[line]
        assert (row.youtube_id, row.status, row.url, row.path, row.clip_id) == (value.strip(), "skipped", "", "", "")
        assert row.reason.startswith("unsafe_id")
    assert m.loc[len(hostile) + 1, "status"] == "ok"
    after = sorted(p.relative_to(tmp_path.parent) for p in tmp_path.parent.rglob("*"))
    created = sorted(set(after) - set(before))
    top = {p.parts[1] if len(p.parts) > 1 else "" for p in created}
    assert top <= {"clips", "manifests", "rows.csv"}, created
    assert [p.name for p in (tmp_path / "clips").iterdir()] == ["good_00001000_00003000.mp4"]


def test_real_ids_starting_with_a_dash_are_downloaded(media_server: MediaServer, tmp_path: Path) -> None:
    """About 1 in 64 YouTube ids starts with '-': kept, fetched, and stored under a path that no
    program can take for an option."""
    m = run_table(tmp_path, ["-dash0,1.0,4.0,0.5,0.5", "_under0,1.0,4.0,0.5,0.5"], media_server.template("v"))
    assert list(m["status"]) == ["ok", "ok"], list(m["reason"])
    assert media_server.requests("/v/-dash0.mp4")
    clip = Path(m.loc[1, "path"])
    assert clip.name == "-dash0_00001000_00004000.mp4" and clip.parent == tmp_path / "clips"
    assert abs(probe(clip).duration - 3.0) < 0.15


def test_segments_longer_than_max_seconds_are_not_fetched(media_server: MediaServer, tmp_path: Path) -> None:
    m = run_table(tmp_path, ["vid0,0.0,9.5,0.5,0.5", "vid1,1.0,4.0,0.5,0.5"], media_server.template("v"), max_seconds=5.0)
    assert (m.loc[1, "status"], m.loc[1, "reason"]) == ("failed", "too_long: segment is 9.50 s, max_seconds is 5")
    assert m.loc[2, "status"] == "ok"
    assert media_server.requests("/v/vid0.mp4") == []   # refused before any request


def test_file_urls(tmp_path: Path, test_video: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "vid0.mp4").symlink_to(test_video)
    rows = ["vid0,1.6,5.0,0.5,0.5", "vid0,8.5,10.5,0.5,0.5", "nofile,1.0,3.0,0.5,0.5"]
    template = "file://{root}/videos/{id}.mp4"

    (tmp_path / "off").mkdir()
    disabled = run_table(tmp_path / "off", rows, template, root=tmp_path, allow_file_urls=False)
    assert list(disabled["status"]) == ["failed"] * 3
    assert all(r.startswith("file_urls_disabled") for r in disabled["reason"])
    assert _final_clips(tmp_path / "off" / "clips") == {}

    (tmp_path / "on").mkdir()
    m = run_table(tmp_path / "on", rows, template, root=tmp_path, allow_file_urls=True, retries=3)
    row = m.loc[1]
    assert row.status == "ok" and row.fetched_url == f"file://{tmp_path.resolve()}/videos/vid0.mp4"
    # the manifest on disk names the source by the template, never by this folder's path
    assert row.url == "file://{root}/videos/vid0.mp4"
    assert str(tmp_path.resolve()) not in (tmp_path / "on" / "manifests" / "download.csv").read_text()
    clip = Path(row.path)
    assert clip.suffix == ".mp4" and _codecs(clip) == ["aac", "h264"] and abs(probe(clip).duration - 3.4) < 0.15
    assert _frame_numbers(clip) == list(range(round(1.6 * FPS), round(5.0 * FPS)))
    assert _video_packets(clip) == round(3.4 * FPS)
    assert m.loc[2, "status"] == "failed" and m.loc[2, "reason"].startswith("segment_outside_video")
    assert (m.loc[3, "status"], m.loc[3, "attempts"]) == ("failed", 1)  # a missing file is not retried
    assert m.loc[3, "reason"].startswith("not_found")
    assert sorted(_final_clips(tmp_path / "on" / "clips")) == ["vid0_00001600_00005000"]
    assert not list((tmp_path / "on" / "clips").glob(".tmp-*"))


@pytest.mark.skipif(not CREMAD.is_dir(), reason=f"real media folder {CREMAD} absent")
def test_real_flv_vp6_mp3_becomes_exact_mp4_clip(tmp_path: Path) -> None:
    m = run_table(tmp_path, ["1001_DFA_ANG_XX,0.4,1.6,0.5,0.5"], "file://{root}/{id}.flv", root=CREMAD,
             allow_file_urls=True, min_seconds=0.5)
    row = m.loc[1]
    assert row.status == "ok", row.reason
    clip = Path(row.path)
    assert clip.name == "1001_DFA_ANG_XX_00000400_00001600.mp4" and _codecs(clip) == ["aac", "h264"]
    info = probe(clip)
    assert abs(info.duration - 1.2) < 0.15 and (info.width, info.height) == (480, 360)


def test_malformed_duplicate_and_limit(tmp_path: Path, test_video: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("vid0", "vid1"):
        (videos / f"{name}.mp4").symlink_to(test_video)
    lines = ["vid0,1.0,3.0,0.5,0.5",
             "vid0,1.0,3.0",                 # 3 fields
             "vid1,one,3.0,0.5,0.5",         # not a number
             "vid1,4.0,2.0,0.5,0.5",         # end before start
             "vid0,1.0000,3.0,0.2,0.8",      # same segment as line 1 (the face centre does not matter)
             "",                             # blank lines are not rows
             "vid1,2.0,4.0,0.5,0.5",
             "vid1,5.0,7.0,0.5,0.5"]
    m = run_table(tmp_path, lines, "file://{root}/videos/{id}.mp4", allow_file_urls=True)
    assert list(m["line"]) == [1, 2, 3, 4, 5, 7, 8]
    assert list(m["status"]) == ["ok", "skipped", "skipped", "skipped", "skipped", "ok", "ok"]
    assert m.loc[2, "reason"].startswith("malformed_row") and m.loc[3, "reason"].startswith("malformed_row")
    assert m.loc[4, "reason"].startswith("bad_segment")
    assert m.loc[5, "reason"] == "duplicate_segment: same segment as line 1"
    assert sorted(_final_clips(tmp_path / "clips")) == sorted(m.loc[[1, 7, 8], "clip_id"])

    # a smaller limit: only the first 3 rows, and clips of rows no longer listed are removed
    again = run_table(tmp_path, lines, "file://{root}/videos/{id}.mp4", allow_file_urls=True, limit=3)
    assert list(again["line"]) == [1, 2, 3]
    assert (again.loc[1, "status"], again.loc[1, "reason"], again.loc[1, "reused"]) == ("ok", "", True)
    assert sorted(_final_clips(tmp_path / "clips")) == [again.loc[1, "clip_id"]]


# --------------------------------------------------------------------------- YouTube's refusals

class _OfflineYoutubeIE(YoutubeIE):
    """yt-dlp's real YouTube extractor, given a player response's playabilityStatus instead of
    fetching one: the error it raises is worded by yt-dlp's own code (reason + subreason, its
    cookie advice, the geo-restriction error), as it would be for YouTube's answer."""

    status: dict = {}

    def _initial_extract(self, url, smuggled_data, webpage_url, webpage_client, video_id):
        # (webpage, ytcfg, initial data, premium subscriber, player responses, player URL)
        return "", {}, {}, False, [{"playabilityStatus": self.status}], None


class _QuietLogger:
    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def _youtube_error(status: dict) -> BaseException:
    """The exception YoutubeDL.extract_info raises for a video whose player response says ``status``."""
    with yt_dlp.YoutubeDL({"logger": _QuietLogger(), "quiet": True, "noplaylist": True, "cachedir": False}) as ydl:
        extractor = _OfflineYoutubeIE(ydl)
        extractor.status = status
        ydl.add_info_extractor(extractor)
        with pytest.raises(yt_dlp.utils.DownloadError) as caught:
            ydl.extract_info("https://www.youtube.com/watch?v=abcdefghijk", ie_key=extractor.ie_key())
    return caught.value


def _error_screen(status: str, reason: str, *subreason: str) -> dict:
    """A playabilityStatus as YouTube sends it with an error screen (reason, subreason runs)."""
    renderer: dict = {"reason": {"simpleText": reason}}
    if subreason:
        renderer["subreason"] = {"runs": [{"text": text} for text in subreason]}
    return {"status": status, "reason": reason, "errorScreen": {"playerErrorMessageRenderer": renderer}}


# YouTube's texts as users of yt-dlp report them; the code the manifest must give each.
YOUTUBE_CASES = [
    (_error_screen("ERROR", "Video unavailable", "This video is no longer available because the YouTube "
                   "account associated with this video has been terminated."), "video_unavailable",
     "Video unavailable. This video is no longer available because the YouTube account associated with this "
     "video has been terminated."),
    (_error_screen("ERROR", "Video unavailable", "This video has been removed by the uploader"),
     "video_unavailable", "Video unavailable. This video has been removed by the uploader"),
    (_error_screen("ERROR", "Video unavailable", "This video is no longer available due to a copyright claim "
                   "by Some Label"), "video_unavailable",
     "Video unavailable. This video is no longer available due to a copyright claim by Some Label"),
    (_error_screen("ERROR", "Video unavailable"), "video_unavailable", "Video unavailable"),
    (_error_screen("ERROR", "This video has been removed for violating YouTube's Terms of Service"),
     "video_unavailable", "This video has been removed for violating YouTube's Terms of Service"),
    # a private video's text asks to sign in and gets yt-dlp's cookie advice: it is still gone
    (_error_screen("LOGIN_REQUIRED", "Private video", "Sign in if you've been granted access to this video"),
     "video_unavailable", "Private video. Sign in if you've been granted access to this video."),
    ({"status": "UNPLAYABLE", "reason": "Join this channel to get access to members-only content like this "
      "video, and other exclusive perks."}, "video_unavailable",
     "Join this channel to get access to members-only content like this video, and other exclusive perks."),
    # YouTube writes a typographic apostrophe here
    (_error_screen("LOGIN_REQUIRED", "Sign in to confirm you\u2019re not a bot", "This helps protect our "
                   "community. ", "Learn more"), "bot_check", "Sign in to confirm you\u2019re not a bot."),
    ({"status": "UNPLAYABLE", "reason": "This content isn't available, try again later."}, "bot_check",
     "This content isn't available, try again later. The current session has been rate-limited by YouTube "
     "for up to an hour."),
    (_error_screen("LOGIN_REQUIRED", "Sign in to confirm your age", "This video may be inappropriate for some "
                   "users."), "age_restricted",
     "Sign in to confirm your age. This video may be inappropriate for some users."),
    ({"status": "UNPLAYABLE", "reason": "This video is age-restricted and only available on YouTube."},
     "age_restricted", "This video is age-restricted and only available on YouTube."),
    (_error_screen("LOGIN_REQUIRED", "Please sign in"), "sign_in_required", "Please sign in."),
    (_error_screen("UNPLAYABLE", "Video unavailable", "The uploader has not made this video available in "
                   "your country"), "geo_restricted",
     "The uploader has not made this video available in your country"),  # yt-dlp's GeoRestrictedError
    (_error_screen("UNPLAYABLE", "Video unavailable", "This video contains content from SME, who has blocked "
                   "it in your country on copyright grounds."), "geo_restricted",
     "Video unavailable. This video contains content from SME, who has blocked it in your country on "
     "copyright grounds."),  # a plain ExtractorError: told by its words
]


@pytest.mark.parametrize("status, code, message", YOUTUBE_CASES, ids=[c[1] + "-" + str(i) for i, c in
                                                                       enumerate(YOUTUBE_CASES)])
def test_youtube_refusals_get_stable_codes(status: dict, code: str, message: str) -> None:
    error = _youtube_error(status)
    failure = classify_error(error)
    assert (failure.code, failure.message, failure.transient) == (code, message, False), str(error)
    assert failure.reason == f"{code}: {message}"  # what the manifest's reason column holds


def test_words_in_a_path_are_not_read_as_youtube_states(tmp_path: Path) -> None:
    # only the site's own refusal is read for words, not a file error naming a folder
    folder = tmp_path / "Private video - sign in to confirm your age"
    folder.mkdir()
    m = run_table(tmp_path, ["vid0,1.0,3.0,0.5,0.5"], f"file://{folder.as_posix()}/{{id}}.mp4", allow_file_urls=True)
    assert m.loc[1, "reason"].startswith("not_found: ")


def test_availability_counts_videos_not_rows(tmp_path: Path) -> None:
    rows = [  # youtube_id, status, reason, attempts
        ("A", "ok", "", 1),
        ("A", "ok", "", 0),  # reused from an earlier run
        ("B", "failed", "video_unavailable: Video unavailable. This video has been removed by the uploader", 1),
        ("B", "failed", "video_unavailable: Video unavailable. This video has been removed by the uploader", 1),
        ("B", "skipped", "duplicate_segment: same segment as line 3", 0),
        ("C", "failed", "video_unavailable: Private video. Sign in if you've been granted access to this video.", 1),
        ("D", "failed", "bot_check: Sign in to confirm you're not a bot.", 1),
        ("E", "failed", "http_429: HTTP Error 429: Too Many Requests (after 4 attempts)", 4),
        ("E", "failed", "bot_check: Sign in to confirm you're not a bot.", 1),
        ("F", "failed", "age_restricted: Sign in to confirm your age.", 1),
        ("G", "failed", "too_short: segment is 0.50 s, min_seconds is 1", 0),
        ("H", "skipped", "malformed_row: 3 fields", 0),
        ("I", "failed", "segment_outside_video: segment 8.00-11.00 s, video is 10.00 s", 1),
        ("K", "failed", "interrupted", 2),
        ("L", "failed", "bot_check: Sign in to confirm you're not a bot.", 1),
        ("L", "ok", "", 1),
        ("M", "failed", "sign_in_required: Please sign in.", 1),
        ("N", "failed", "http_404: HTTP Error 404: Not Found", 1),          # gone from a plain server
        ("O", "failed", "not_found: [Errno 2] No such file or directory", 1),  # or from the disk
    ]
    table = pd.DataFrame(rows, columns=["youtube_id", "status", "reason", "attempts"])
    write_table(table, tmp_path / "download.csv")  # a CSV round trip: ids and reasons stay strings
    stats = availability(read_table(tmp_path / "download.csv"))
    # answered: A, B, C, F, I, L (ok besides its bot_check), M, N, O. Not: D, E (refused), G
    # (never fetched), H (bad row), K (interrupted). Gone: B, C, N, O.
    assert stats == {"videos": 9, "unavailable": 4, "clips_lost": 5,
                     "blocked": {"bot_check": 3, "http_429": 1}, "blocked_videos": 3,
                     "sign_in": {"age_restricted": 1, "sign_in_required": 1}}
    assert availability_lines(stats) == [
        "download: videos no longer available: 4 of 9 (44.4 %); clips lost with them: 5",
        "download: YouTube refused this machine for 4 clips of 3 videos (bot_check: 3, http_429: 1): "
        "set download.cookies / download.sleep_seconds and run again (failed rows are retried)",
        "download: 2 clips need a signed-in YouTube account (age_restricted: 1, sign_in_required: 1): "
        "set download.cookies",
    ]
    clean = availability(table[table["youtube_id"] == "A"])
    assert availability_lines(clean) == [
        "download: videos no longer available: 0 of 1 (0.0 %); clips lost with them: 0"]


def test_rate_limit_is_reported_with_a_hint(media_server: MediaServer, tmp_path: Path, capsys) -> None:
    m = run_table(tmp_path, ["vid0,1.0,3.0,0.5,0.5", "vid1,1.0,3.0,0.5,0.5", "vid1,4.0,6.0,0.5,0.5"],
             media_server.template("err429-99"), retries=1, backoff_seconds=0.05)
    assert list(m["status"]) == ["failed"] * 3 and all(r.startswith("http_429: ") for r in m["reason"])
    assert list(m["attempts"]) == [2, 2, 2]  # transient: retried once
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("download: YouTube refused this machine for 3 clips of 2 videos (http_429: 3): "
                        "set download.cookies / download.sleep_seconds and run again (failed rows are retried)")
    assert lines[-1].startswith("download: 0 done, 3 skipped (http_429: 3)")  # the summary stays last


def _cookies_file(path: Path, value: str = "s3cret") -> Path:
    # Netscape format: domain, include subdomains, path, https only, expires (0 = session), name, value
    path.write_text("# Netscape HTTP Cookie File\n" f"127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\t{value}\n")
    return path


def test_cookies_reach_the_server_and_sleep_delays_the_download(media_server: MediaServer, tmp_path: Path) -> None:
    cookies = _cookies_file(tmp_path / "cookies.txt")
    before = cookies.read_bytes()
    (tmp_path / "with").mkdir()
    m = run_table(tmp_path / "with", ["vid0,1.0,3.0,0.5,0.5"], media_server.template("v"), workers=1,
             cookies=cookies, sleep_seconds=1.5)
    assert m.loc[1, "status"] == "ok"
    # yt-dlp's own requests (on YouTube: the page and player API, where the bot check and the age
    # gate are) carry the cookie. ffmpeg's reads are not checked: ffmpeg 5.1 matches a cookie's
    # domain against "host:port", so no cookie reaches a URL with a port like this server's.
    sent = [cookie for path, has_range, cookie in media_server.cookies if path == "/v/vid0.mp4" and not has_range]
    assert sent == ["sid=s3cret"]
    assert cookies.read_bytes() == before  # yt-dlp wrote its jar to a copy, not to the user's file

    (tmp_path / "without").mkdir()
    m = run_table(tmp_path / "without", ["vid1,1.0,3.0,0.5,0.5"], media_server.template("v"), workers=1)
    assert m.loc[1, "status"] == "ok"
    assert [cookie for path, has_range, cookie in media_server.cookies
            if path == "/v/vid1.mp4" and not has_range] == [None]

    def gap(path: str) -> float:
        """Seconds from yt-dlp's GET (extraction) to ffmpeg's first read (the download)."""
        log = media_server.requests(path)
        first_get = min(t for t, method, _, has_range in log if method == "GET" and not has_range)
        return min(t for t, _, _, has_range in log if has_range) - first_get

    assert gap("/v/vid0.mp4") >= 1.5 > gap("/v/vid1.mp4")


def test_read_cookies(tmp_path: Path) -> None:
    text = read_cookies(_cookies_file(tmp_path / "ok.txt"))
    assert "127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\ts3cret" in text
    (tmp_path / "json.txt").write_text('[{"name": "sid", "value": "s3cret"}]\n')
    (tmp_path / "plain.txt").write_text("sid=s3cret\n")
    (tmp_path / "empty.txt").write_text("# Netscape HTTP Cookie File\n")
    for name, why in (("json.txt", "JSON, not Netscape format"),
                      ("plain.txt", "no '# Netscape HTTP Cookie File' first line"),
                      ("empty.txt", "no cookies in it"), ("missing.txt", "cannot read it (FileNotFoundError)")):
        with pytest.raises(ValueError) as caught:
            read_cookies(tmp_path / name)
        assert str(caught.value) == why


GOOD_PARAMS = {"csv": "rows.csv", "limit": None, "url_template": "https://www.youtube.com/watch?v={id}",
               "allow_file_urls": False, "workers": 2, "retries": 1, "backoff_seconds": 1.0,
               "timeout_seconds": 30, "min_seconds": 1.0}


@pytest.mark.parametrize("key, value, message", [
    ("workers", 0, "download.workers = 0: expected an integer >= 1"),
    ("url_template", "https://example.com/watch", "download.url_template"),
    ("url_template", "{id}.mp4", "download.url_template"),
    ("retries", -1, "download.retries"),
    ("limit", 0, "download.limit"),
    ("allow_file_urls", "yes", "download.allow_file_urls"),
    ("timeout_seconds", 0, "download.timeout_seconds"),
    ("csv", "missing.csv", "download.csv"),
    ("cookies", "missing.txt", "download.cookies = 'missing.txt': expected null or an existing cookies.txt file"),
    ("cookies", "json.txt", "download.cookies = 'json.txt': expected a Netscape cookies.txt file (JSON, not "
                            "Netscape format)"),
    ("cookies", "", "download.cookies = '': expected null or the path of a cookies.txt file"),
    ("sleep_seconds", -1, "download.sleep_seconds = -1: expected a number >= 0.0"),
    ("sleep_seconds", "2s", "download.sleep_seconds = '2s': expected a number"),
    ("requests_per_second", -0.5, "download.requests_per_second = -0.5: expected a number >= 0.0"),
    ("per_host", 0, "download.per_host = 0: expected an integer >= 1"),
    ("pause_seconds", 7200, "download.pause_seconds = 7200: expected a number >= 0.0 and <= 3600.0"),
])
def test_bad_params_raise_params_error(tmp_path: Path, monkeypatch, key, value, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("vid0,1.0,3.0,0.5,0.5\n")
    (tmp_path / "json.txt").write_text('[{"name": "sid", "value": "s3cret"}]\n')
    assert build_config(DownloadConfig, GOOD_PARAMS).workers == 2
    with pytest.raises(ParamsError) as caught:
        build_config(DownloadConfig, {**GOOD_PARAMS, key: value})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cookies_and_sleep_params(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("vid0,1.0,3.0,0.5,0.5\n")
    _cookies_file(tmp_path / "cookies.txt")
    defaults = build_config(DownloadConfig, GOOD_PARAMS)  # keys absent: as before, no cookies, no pause
    assert (defaults.cookies, defaults.sleep_seconds) == (None, 0.0)
    set_ = build_config(DownloadConfig, {**GOOD_PARAMS, "cookies": "cookies.txt", "sleep_seconds": 2})
    assert (set_.cookies, set_.sleep_seconds) == ("cookies.txt", 2.0)
    project = yaml.safe_load((ROOT / "params.yaml").read_text())["download"]
    assert (project["cookies"], project["sleep_seconds"]) == (None, 0.0)


@pytest.mark.parametrize("override, line", [
    ({"workers": 0}, "download: params.yaml: download.workers = 0: expected an integer >= 1"),
    ({"cookies": "~/no-such-cookies.txt"},
     "download: params.yaml: download.cookies = '~/no-such-cookies.txt': "
     "expected null or an existing cookies.txt file"),
])
def test_stage_script_reports_bad_params_in_one_line(tmp_path: Path, override: dict, line: str) -> None:
    (tmp_path / "rows.csv").write_text("vid0,1.0,3.0,0.5,0.5\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": {**GOOD_PARAMS, **override}}))
    shutil.copy(ROOT / "dvc.yaml", tmp_path)   # the stage's paths
    result = subprocess.run([sys.executable, str(STAGE)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == line
    assert not (tmp_path / "data").exists()
