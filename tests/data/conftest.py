"""Fixtures of the data-stage tests: the numbered test video and the local media server."""

from __future__ import annotations

from pathlib import Path

import pytest
from media_server import make_test_video, serving


@pytest.fixture(scope="module")
def test_video(tmp_path_factory) -> Path:
    return make_test_video(tmp_path_factory.mktemp("video") / "video.mp4")


@pytest.fixture()
def media_server(test_video: Path):
    data = test_video.read_bytes()
    with serving({**{f"vid{i}": data for i in range(8)}, "-dash0": data, "_under0": data}) as server:
        yield server
