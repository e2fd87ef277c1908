"""``speech2face serve``: the real console script, driven in a real headless Chromium (Debian's
``chromium``, through Playwright).

Models: the seeded encoder and decoder of test_cli.py (voice_models.py), whose face for a
LibriSpeech recording is a detectable face. Gallery: a faces folder in the pipeline's format
with three test identities (real face photos as crops, seeded features) and one train
identity, which must never be shown.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from speech2face.core.tables import write_table
from speech2face.data.face_files import INDEX_COLUMNS, save_arrays
from speech2face.models.encoder_io import load_encoder
from speech2face.models.face_decoder import load_decoder
from speech2face.voice_to_face import predict_face
from voice_models import FEATURE_DIM, LIBRISPEECH, MEDIA, SETTINGS, write_models

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "speech2face"
CHROMIUM = shutil.which("chromium")
# The gallery: (identity, split, photo); the train identity must never be offered as a neighbour.
PEOPLE = [("astro", "test", "astronaut.png"), ("obama", "test", "obama.jpg"), ("biden", "test", "biden.jpg"),
          ("trainee", "train", "obama2.jpg")]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)"),
    pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"real media folder {MEDIA} absent"),
]


def _faces_folder(folder: Path) -> dict[str, np.ndarray]:
    """data/faces in the pipeline's format; returns each identity's feature."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(PEOPLE), FEATURE_DIM)).astype(np.float32)
    crops = np.stack([np.asarray(Image.open(MEDIA / "faces" / photo).convert("RGB").resize((224, 224)), np.uint8)
                      for _, _, photo in PEOPLE])
    landmarks = np.zeros((len(PEOPLE), 68, 2), np.float32)
    save_arrays(folder, "shard-00000", {"features": features, "crops": crops, "landmarks": landmarks})
    index = pd.DataFrame([{"clip_id": f"{name}_clip", "identity": name, "row": i, "status": "ok", "reason": "",
                           "frames_examined": 1, "frames_with_face": 1, "faces_in_frame": 1,
                           "shard": "shard-00000", "split": split} for i, (name, split, _) in enumerate(PEOPLE)],
                         columns=INDEX_COLUMNS)
    write_table(index, folder / "index.csv")
    return {name: features[i] for i, (name, _, _) in enumerate(PEOPLE)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    encoder_path, decoder_path, _ = write_models(folder)
    features = _faces_folder(folder / "data" / "faces")
    port = _free_port()
    process = subprocess.Popen([str(CONSOLE_SCRIPT), "serve", "--port", str(port)], cwd=folder,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            health = _get(f"{url}/api/health")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("speech2face serve did not start: " + process.communicate()[0][-2000:])
            time.sleep(0.3)
    assert health == {"models": {"encoder": "models/voice_encoder.pt", "decoder": "models/face_decoder.pt"},
                      "gallery": {"split": "test", "identities": 3}}
    yield {"url": url, "encoder": encoder_path, "decoder": decoder_path, "features": features, "process": process}
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def _image_of(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_upload_shows_a_face_and_the_nearest_test_faces(server, browser, tmp_path) -> None:
    import face_recognition

    recording = sorted(LIBRISPEECH.rglob("*.flac"))[0]
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server["url"])
    page.set_input_files("#file", str(recording))
    page.wait_for_function("document.getElementById('face').src.startsWith('data:image/png')", timeout=60_000)
    assert page.inner_text("#error") == ""

    # the face on the page is the one predict_face gives, and a detector finds a face in it
    shown = _image_of(page.get_attribute("#face", "src"))
    encoder, decoder = load_encoder(server["encoder"]), load_decoder(server["decoder"])
    with torch.no_grad():
        prediction = predict_face(recording, encoder, decoder, SETTINGS)
    assert shown.shape == (224, 224, 3) and np.array_equal(shown, prediction.image)
    assert len(face_recognition.face_locations(shown)) == 1

    # neighbours: the three test identities (never the train one), by cosine, as computed here
    rows = page.locator("#neighbours tr")
    assert rows.count() == 3
    names = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(3)]
    cosines = [float(rows.nth(i).locator("td").nth(2).inner_text().split()[-1]) for i in range(3)]
    query = prediction.feature / np.linalg.norm(prediction.feature)
    expected = {name: float(f @ query / np.linalg.norm(f)) for name, f in server["features"].items() if name != "trainee"}
    assert names == sorted(expected, key=lambda n: -expected[n])
    assert cosines == pytest.approx([expected[n] for n in names], abs=1e-3)
    assert "models/voice_encoder.pt" in page.inner_text("#models")

    # offline: the page asked nothing of any other host
    assert requested and all(url.startswith(server["url"]) or url.startswith("data:") for url in requested), requested
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
    page.close()


def test_a_bad_file_gets_a_message_and_the_server_goes_on(server, browser, tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a recording\n" * 20)
    page = browser.new_page()
    page.goto(server["url"])
    page.set_input_files("#file", str(text))
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    message = page.inner_text("#error")
    assert message.startswith("notes.txt: not a media file ffmpeg can read"), message
    assert "speech2face-serve" not in message   # the server's temp path is not shown
    assert page.locator("#result").is_hidden()
    page.close()

    assert server["process"].poll() is None
    assert _get(f"{server['url']}/api/health")["gallery"]["identities"] == 3
    silent = tmp_path / "silent.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2",
                    str(silent)], check=True)
    request = urllib.request.Request(f"{server['url']}/api/predict", data=silent.read_bytes(), method="POST",
                                     headers={"X-Filename": "silent.wav"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 400
    assert json.loads(answer.value.read()) == {"error": "silent.wav: the audio is silent"}
