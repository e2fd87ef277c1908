"""``speech2face serve``: a local web page to try the models without a terminal.

A visitor uploads an audio or video file, or records from the microphone; the page shows the
predicted face, the test-split faces nearest to it (cosine similarity of the face features,
as in the retrieval evaluation) and which model files answered. Everything is served from
here: one HTML page with its CSS and JavaScript inline, no CDN, no fonts or scripts from
elsewhere, no telemetry. Bad files get a message on the page; the server goes on.

Why FastAPI rather than Gradio: FastAPI, Starlette and uvicorn already come with MLflow, so
the page adds no package; Gradio would add about 40, and its default theme fetches fonts
from a CDN, which a fully offline page cannot. Uploads go as the request body (no multipart
parser needed), at most ``MAX_UPLOAD_BYTES``.
"""

from __future__ import annotations

import base64
import io
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from speech2face.core.tables import OK, read_table
from speech2face.data.face_files import FaceArrays
from speech2face.evaluation.metrics import identity_gallery, unit
from speech2face.evaluation.retrieval import top_k
from speech2face.models.face_decoder import FaceDecoder
from speech2face.models.voice_encoder import VoiceEncoder
from speech2face.voice_to_face import MAX_SECONDS, VoiceError, predict_face

MAX_UPLOAD_BYTES = 100 * 2**20      # a 10-minute WAV at 44.1 kHz stereo is 106 MB; compressed files are far smaller
NEIGHBOURS = 5


def png_data_url(image: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


@dataclass
class Gallery:
    """One face per identity of a split of ``data/faces``: the mean feature of its clips (what
    the evaluation compares with) and the crop of its first clip (what a person looks at)."""

    identities: np.ndarray
    features: np.ndarray     # (n, dim), unit length
    crops: list[np.ndarray]
    split: str


def load_gallery(faces_dir: str | Path, split: str = "test") -> Gallery | None:
    """The ``split`` identities of a faces folder, or None when there is none (no pipeline run)."""
    index_path = Path(faces_dir) / "index.csv"
    if not index_path.is_file():
        return None
    index = read_table(index_path)
    usable = index[(index["status"] == OK) & (index["split"] == split)].reset_index(drop=True)
    if usable.empty:
        return None
    arrays = FaceArrays(faces_dir)
    features = np.stack(arrays.gather("features", usable["shard"], usable["row"]))
    names, gallery, true_index = identity_gallery(usable["identity"].to_numpy(), features)
    first_row = {identity: i for i, identity in reversed(list(enumerate(usable["identity"])))}
    crops = [arrays.row("crops", usable.loc[first_row[name], "shard"], usable.loc[first_row[name], "row"])
             for name in names]
    return Gallery(names, unit(gallery), crops, split)


class FaceService:
    """The models (loaded once) and the gallery; ``answer`` turns uploaded bytes into the page's
    JSON. One prediction at a time: torch is not asked to share the model between threads."""

    def __init__(self, encoder: VoiceEncoder, decoder: FaceDecoder, settings, models: dict[str, str],
                 gallery: Gallery | None, max_windows: int = 8, max_seconds: float = MAX_SECONDS):
        self.encoder, self.decoder, self.settings = encoder, decoder, settings
        self.models = models
        self.gallery = gallery
        self.max_windows, self.max_seconds = max_windows, max_seconds
        self._lock = threading.Lock()

    def answer(self, data: bytes, filename: str) -> dict:
        """The prediction for one uploaded file; ``VoiceError`` (one line naming ``filename``)
        when it is not a usable recording."""
        if not data:
            raise VoiceError(f"{filename}: the file is empty")
        suffix = "".join(re.findall(r"\.[A-Za-z0-9]{1,8}$", filename))   # a hint for ffmpeg, nothing more
        with tempfile.TemporaryDirectory(prefix="speech2face-serve-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                with self._lock, torch.no_grad():
                    prediction = predict_face(path, self.encoder, self.decoder, self.settings, self.max_windows,
                                              self.max_seconds)
            except VoiceError as error:
                raise VoiceError(str(error).replace(str(path), filename)) from None
        return {"face": png_data_url(prediction.image), "seconds": round(prediction.seconds, 2),
                "windows": prediction.windows, "models": self.models, "neighbours": self.neighbours(prediction.feature)}

    def neighbours(self, feature: np.ndarray) -> list[dict]:
        if self.gallery is None:
            return []
        query = unit(feature[None])
        nearest = top_k(query, self.gallery.features, NEIGHBOURS)[0]
        similarity = self.gallery.features[nearest] @ query[0]
        return [{"identity": str(self.gallery.identities[i]), "similarity": round(float(s), 3),
                 "face": png_data_url(self.gallery.crops[i])} for i, s in zip(nearest, similarity)]


def create_app(service: FaceService):
    """The FastAPI app: ``/`` the page, ``POST /api/predict`` (the file as the body, its name in
    the ``X-Filename`` header), ``/api/health``."""
    app = FastAPI(title="Speech2Face", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/health")
    def health() -> dict:
        gallery = service.gallery
        return {"models": service.models, "gallery": None if gallery is None else
                {"split": gallery.split, "identities": len(gallery.identities)}}

    @app.post("/api/predict")
    async def predict(request: Request):
        filename = Path(unquote(request.headers.get("x-filename") or "upload")).name[:200] or "upload"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"{filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MB"}, 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                return JSONResponse({"error": f"{filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MB"}, 413)
        try:
            # a plain function on a worker thread: the event loop stays free for other visitors
            return await run_in_threadpool(service.answer, bytes(body), filename)
        except VoiceError as error:
            return JSONResponse({"error": str(error)}, 400)

    return app


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Speech2Face</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 56rem; padding: 0 1rem; color: #222; }
  h1 { margin-bottom: .2rem; }
  .note { color: #555; margin-top: 0; }
  .controls { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: 1.5rem 0; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; flex: 1; min-width: 16rem; }
  #drop.over { border-color: #2a6; background: #efe; }
  button { font-size: 1rem; padding: .5rem 1rem; }
  #status { min-height: 1.5rem; }
  #error { color: #b00; font-weight: 600; min-height: 1.5rem; }
  #result { display: none; gap: 2rem; flex-wrap: wrap; }
  #face { width: 224px; height: 224px; border-radius: 8px; }
  table { border-collapse: collapse; }
  td { padding: .2rem .6rem; vertical-align: middle; }
  td img { width: 64px; height: 64px; border-radius: 4px; }
  .models { color: #555; font-size: .9rem; }
</style>
</head>
<body>
<h1>Speech2Face</h1>
<p class="note">A face predicted from a voice (Oh et al., CVPR 2019). Everything runs on this machine.
The bundled models learned from the small synthetic sample: expect a blend of its faces,
not a portrait of the speaker (see the README on training with AVSpeech).</p>
<div class="controls">
  <label id="drop">Drop an audio or video file here, or choose one:
    <input id="file" type="file" accept="audio/*,video/*"></label>
  <button id="record" type="button">Record 8 s from the microphone</button>
</div>
<div id="status"></div>
<div id="error" role="alert"></div>
<div id="result">
  <div><h2>Predicted face</h2><img id="face" alt="predicted face"><p id="info"></p></div>
  <div><h2>Nearest test faces</h2><table id="neighbours"></table><p id="nogallery"></p></div>
</div>
<p class="models" id="models"></p>
<script>
const $ = (id) => document.getElementById(id);
async function send(blob, name) {
  $("error").textContent = "";
  $("status").textContent = "Listening to " + name + " ...";
  let answer;
  try {
    const response = await fetch("/api/predict", {method: "POST", body: blob,
      headers: {"X-Filename": encodeURIComponent(name).slice(0, 200), "Content-Type": "application/octet-stream"}});
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || ("HTTP " + response.status));
  } catch (error) {
    $("status").textContent = "";
    $("error").textContent = error.message;
    return;
  }
  $("status").textContent = "";
  $("face").src = answer.face;
  $("info").textContent = answer.seconds + " s of audio, " + answer.windows + " window(s) of 6 s";
  const rows = answer.neighbours.map((n) =>
    "<tr><td><img alt='test face' src='" + n.face + "'></td><td>" + n.identity.replace(/[<>&'"]/g, "") +
    "</td><td>cosine " + n.similarity.toFixed(3) + "</td></tr>");
  $("neighbours").innerHTML = rows.join("");
  $("nogallery").textContent = rows.length ? "" : "No test gallery: run the pipeline (dvc repro) first.";
  $("models").textContent = "Models: encoder " + answer.models.encoder + ", decoder " + answer.models.decoder;
  $("result").style.display = "flex";
}
$("file").addEventListener("change", () => { const f = $("file").files[0]; if (f) send(f, f.name); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  const f = e.dataTransfer.files[0]; if (f) send(f, f.name);
});
$("record").addEventListener("click", async () => {
  $("error").textContent = "";
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({audio: true}); }
  catch (error) { $("error").textContent = "No microphone: " + error.message; return; }
  const recorder = new MediaRecorder(stream); const parts = [];
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.onstop = () => { stream.getTracks().forEach((t) => t.stop());
    send(new Blob(parts, {type: recorder.mimeType}), "microphone.webm"); };
  recorder.start(); $("status").textContent = "Recording 8 s ...";
  setTimeout(() => recorder.stop(), 8000);
});
</script>
</body>
</html>
"""
