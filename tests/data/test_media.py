"""In-process decoding (``media.decode_clip``, PyAV) against the ffmpeg program.

The reference below is how the extract stage decoded before it moved in process: ffprobe
for the durations, then one ffmpeg run with ``-ac 1 -ar RATE`` for the audio and a
``select`` + ``scale`` filter for the frames. Both must give the same audio (to one
least significant bit: the resampler's rounding) and the same frames.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from speech2face.data import media
from speech2face.data.media import MediaError, decode_clip

ROOT = Path(__file__).resolve().parents[2]
CREMAD = ROOT.parent / "shared" / "media" / "av" / "cremad"
SAMPLE_VIDEOS = ROOT / "data" / "sample" / "videos"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def ffprobe_info(path: Path) -> media.ProbeInfo:
    """What the ffprobe program reports, read as ``media.probe`` did when it ran the program."""
    info = ffmpeg.probe(str(path))
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    duration = float(info["format"]["duration"])
    video_duration = float(video["duration"]) if video and video.get("duration") else duration
    return media.ProbeInfo(duration=duration, video_duration=min(video_duration, duration),
                           has_audio=any(s.get("codec_type") == "audio" for s in streams), has_video=video is not None,
                           width=int(video.get("width", 0)) if video else 0,
                           height=int(video.get("height", 0)) if video else 0)


def reference_decode(path: Path, n_frames: int, sample_rate: int, max_side: int):
    """The ffmpeg command line: ffprobe, then audio to a raw file and selected frames to a pipe."""
    info = ffprobe_info(path)
    width, height = media.scaled_size(info.width, info.height, max_side)
    slice_seconds = info.video_duration / n_frames
    targets = [(k + 0.5) * slice_seconds for k in range(n_frames)]
    terms = [f"gte(t,{targets[0]:.4f})*isnan(prev_selected_t)"]
    terms += [f"gte(t,{t:.4f})*lt(prev_selected_t,{t:.4f})" for t in targets[1:]]
    audio, _ = (ffmpeg.input(str(path)).output("pipe:", map="0:a:0", ac=1, ar=sample_rate, format="s16le",
                                                acodec="pcm_s16le").run(capture_stdout=True, capture_stderr=True))
    video = ffmpeg.input(str(path))["v:0"].filter("select", "+".join(terms)).filter("scale", width, height)
    raw, _ = video.output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=n_frames,
                          fps_mode="passthrough").run(capture_stdout=True, capture_stderr=True)
    size = width * height * 3
    frames = [np.frombuffer(raw, np.uint8, size, i * size).reshape(height, width, 3) for i in range(len(raw) // size)]
    return np.frombuffer(audio, np.int16), frames, info


def assert_same_decode(path: Path, n_frames: int, sample_rate: int = 16000, max_side: int = 640,
                       frame_tolerance: int = 0, same_duration: bool = True) -> None:
    audio, frames, info = decode_clip(path, n_frames, sample_rate, max_side)
    want_audio, want_frames, want_info = reference_decode(path, n_frames, sample_rate, max_side)
    if same_duration:
        assert info == want_info
    else:
        assert info.video_duration == want_info.video_duration
    assert audio.dtype == np.int16 and len(audio) == len(want_audio)
    assert np.abs(audio.astype(np.int32) - want_audio).max() <= 1
    assert len(frames) == len(want_frames) == n_frames
    for got, want in zip(frames, want_frames):
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.abs(got.astype(np.int16) - want).max() <= frame_tolerance


@pytest.mark.skipif(not SAMPLE_VIDEOS.is_dir(), reason="sample corpus absent")
def test_probe_in_process_matches_the_ffprobe_program(tmp_path: Path) -> None:
    """``media.probe`` reads the header in process; ffprobe prints lengths to the microsecond,
    and the lengths of a clip cut the download stage's way may differ by its rounding."""
    videos = sorted(p for p in SAMPLE_VIDEOS.glob("*.mp4") if p.stat().st_size > 100_000)[:6]
    _ffmpeg("-ss", "1", "-i", str(videos[0]), "-t", "3.3", "-c:v", "libx264", "-c:a", "aac", str(tmp_path / "cut.mp4"))
    _ffmpeg("-i", str(videos[0]), "-an", "-c:v", "copy", str(tmp_path / "silent.mp4"))
    files = [*videos, *sorted(CREMAD.glob("*.flv"))[:2], tmp_path / "cut.mp4", tmp_path / "silent.mp4"]
    for path in files:
        got, want = media.probe(path), ffprobe_info(path)
        assert (got.has_audio, got.has_video, got.width, got.height) == \
               (want.has_audio, want.has_video, want.width, want.height), path
        assert abs(got.duration - want.duration) <= 0.0015 and abs(got.video_duration - want.video_duration) <= 0.0015
    assert not media.probe(tmp_path / "silent.mp4").has_audio
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match="^undecodable: Invalid data found when processing input$"):
        media.probe(tmp_path / "noise.mp4")


def test_sample_mp4_clips_match_the_ffmpeg_program(tmp_path: Path) -> None:
    """H.264/AAC MP4 at 12 fps; 3 and 7 frames (targets fall on frame boundaries too)."""
    videos = sorted(SAMPLE_VIDEOS.glob("*.mp4"))[:2]
    assert videos, "embedded sample corpus missing"
    for video in videos:
        clip = tmp_path / f"{video.stem}.mp4"
        _ffmpeg("-ss", "2", "-t", "7", "-i", str(video), "-c:v", "libx264", "-c:a", "aac", str(clip))
        assert_same_decode(clip, 3)
        assert_same_decode(clip, 7)


@pytest.mark.skipif(not CREMAD.is_dir(), reason=f"real media folder {CREMAD} absent")
def test_cremad_flv_vp6_mp3_scaled_matches_the_ffmpeg_program() -> None:
    """FLV with VP6 video (480x360, scaled to 320x240 here), MP3 audio at 44.1 kHz, a
    video stream that starts 27 ms after the file."""
    for flv in sorted(CREMAD.glob("*.flv"))[:3]:
        assert_same_decode(flv, 3, max_side=320, frame_tolerance=2)
        assert_same_decode(flv, 3, max_side=640)


def test_non_zero_start_time_and_stereo_48k(tmp_path: Path) -> None:
    """Timestamps that start at 10 s (as in a cut that kept its source times) and 48 kHz
    stereo audio: the frames are chosen relative to the file's start, as ffmpeg does."""
    clip = tmp_path / "offset.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=6", "-f", "lavfi",
            "-i", "sine=frequency=440:sample_rate=48000:duration=6", "-ac", "2", "-pix_fmt", "yuv420p",
            "-c:v", "libx264", "-c:a", "aac", "-output_ts_offset", "10", str(clip))
    # Debian's ffprobe 5.1 gives this file a duration of 16 s (start time + length); the
    # FFmpeg 7 libraries inside PyAV give its length, 6.02 s. Frames are timed by the video
    # stream's own 6 s in both.
    assert_same_decode(clip, 3, same_duration=False)
    audio, frames, info = decode_clip(clip, 3)
    assert abs(info.duration - 6.02) < 0.01 and info.video_duration == 6.0
    assert abs(len(audio) / 16000 - 6.0) < 0.05
    assert not np.array_equal(frames[0], frames[1])


def test_damaged_files_fail_with_a_reason_or_decode_what_is_left(tmp_path: Path) -> None:
    source = sorted(SAMPLE_VIDEOS.glob("*.mp4"))[0]
    data = source.read_bytes()
    cases = {
        "empty.mp4": b"",
        "text.mp4": b"not a video at all\n" * 100,
        "header_only.mp4": data[:400],
        "first_half.mp4": data[: len(data) // 2],
    }
    middle = bytearray(data)
    rng = np.random.default_rng(0)
    start = len(data) // 3
    middle[start:start + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases["garbage_in_middle.mp4"] = bytes(middle)
    outcomes = {}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        try:
            audio, frames, _ = decode_clip(path, 3)
            outcomes[name] = ("ok", len(frames), len(audio))
        except MediaError as error:
            outcomes[name] = (error.reason,)
    assert outcomes["empty.mp4"] == ("undecodable",)
    assert outcomes["text.mp4"] == ("undecodable",)
    assert outcomes["header_only.mp4"][0] in ("undecodable", "no_video", "no_audio", "no_frames", "empty_audio")
    # Damage inside the file: what ffmpeg can still decode comes back (3 frames, audio).
    assert outcomes["garbage_in_middle.mp4"][0] == "ok" and outcomes["garbage_in_middle.mp4"][1] == 3
    assert outcomes["first_half.mp4"][0] in ("ok", "undecodable", "no_frames")


def test_missing_streams_are_named(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=2", "-pix_fmt", "yuv420p", str(silent))
    with pytest.raises(MediaError) as error:
        decode_clip(silent, 3)
    assert error.value.reason == "no_audio"
    sound = tmp_path / "sound.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=2", str(sound))
    with pytest.raises(MediaError) as error:
        decode_clip(sound, 3)
    assert error.value.reason == "no_video"


class _CountingServer:
    """A local HTTP server that counts the requests it gets (there must be none)."""

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        counter = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                counter.append(self.path)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_files_that_name_other_files_or_urls_are_refused(tmp_path: Path) -> None:
    """Media from a CSV or the command line are read as local files of a media format: a
    playlist or a concat script inside them cannot reach the network or another file."""
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=2", "-f", "lavfi", "-i",
            "sine=duration=2", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest",
            "-f", "mpegts", str(tmp_path / "real.ts"))
    assert decode_clip(tmp_path / "real.ts", 1)[1]   # the referenced file itself is fine
    with _CountingServer() as server:
        hostile = {
            "network.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{server.url}/seg.ts\n#EXT-X-ENDLIST\n",
            "local.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nreal.ts\n#EXT-X-ENDLIST\n",
            "concat.mp4": "ffconcat version 1.0\nfile real.ts\n",    # the extension is no defence
        }
        for name, text in hostile.items():
            path = tmp_path / name
            path.write_text(text)
            for read in (lambda p: decode_clip(p, 1), media.probe, media.decode_audio):
                with pytest.raises(MediaError):
                    read(path)
        assert server.requests == []


def test_a_path_that_starts_with_a_dash_is_a_file_not_an_option(tmp_path: Path, monkeypatch) -> None:
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(tmp_path / "-y.wav"))
    monkeypatch.chdir(tmp_path)
    assert abs(media.probe("-y.wav").duration - 1.0) < 0.05
    assert len(media.decode_audio("-y.wav")) == 16000
