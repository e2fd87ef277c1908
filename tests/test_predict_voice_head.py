"""``speech2face predict VOICE --encoder models/voice_head.pt``: a face from the GE2E voice head.

The voice head's file holds GE2E and the head; its JSON says how the recording is prepared
(resemblyzer's preprocessing). Checked on real LibriSpeech recordings: the PNG is
``predict_face``'s image, and the feature equals the head applied to resemblyzer's *own*
``VoiceEncoder.embed_utterance`` of the preprocessed recording (an independent
implementation of the mel, the partials and the LSTM); the reported count is resemblyzer's
number of partials; different speakers give different faces; a head and decoder of
different sizes are refused in one line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from speech2face.cli import main
from speech2face.models import ge2e
from speech2face.models.face_decoder import load_decoder
from speech2face.models.voice_head import VoiceHead, load_voice_head, save_voice_head
from speech2face.voice_to_face import VoiceHeadSettings, load_voice, predict_face
from voice_models import FEATURE_DIM, LIBRISPEECH, write_models

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    resemblyzer = pytest.importorskip("resemblyzer", reason=f"resemblyzer absent ({ge2e.INSTALL_COMMAND})")

pytestmark = [pytest.mark.skipif(not LIBRISPEECH.is_dir(), reason=f"{LIBRISPEECH} absent"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("voice-head")
    _, decoder_path, features = write_models(folder)
    torch.manual_seed(0)
    head = VoiceHead(out_dim=FEATURE_DIM, hidden=0, backbone=ge2e.load_pretrained_ge2e())
    # outputs spread like the decoder's calibration features, so the faces show the voice
    with torch.no_grad():
        head.head[-1].weight.normal_(0, 1).mul_(features.std(0)[:, None] * 4)
        head.head[-1].bias.copy_(features.mean(0))
    save_voice_head(head, folder / "models" / "voice_head.pt", preprocess=True)
    small = VoiceHead(out_dim=FEATURE_DIM // 2, hidden=0, backbone=ge2e.load_pretrained_ge2e())
    save_voice_head(small, folder / "models" / "small_head.pt", preprocess=True)
    return {"head": folder / "models" / "voice_head.pt", "small": folder / "models" / "small_head.pt",
            "decoder": decoder_path}


def recordings() -> list[Path]:
    speakers = sorted(p for p in LIBRISPEECH.iterdir() if p.is_dir())[:2]
    return [sorted(s.glob("*.flac"))[0] for s in speakers]


def run(voice: Path, output: Path, encoder: Path, decoder: Path):
    result = CliRunner().invoke(main, ["predict", str(voice), "-o", str(output), "--encoder", str(encoder),
                                       "--decoder", str(decoder)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_face_from_the_voice_head_matches_resemblyzer_and_the_head(files, tmp_path) -> None:
    head = torch.load(files["head"], weights_only=True)
    reference_encoder = resemblyzer.VoiceEncoder("cpu", verbose=False)
    decoder = load_decoder(files["decoder"])
    images = []
    for voice in recordings():
        output = tmp_path / f"{voice.stem}.png"
        result = run(voice, output, files["head"], files["decoder"])
        assert result.exit_code == 0, result.output
        samples = load_voice(voice, ge2e.SAMPLE_RATE)
        wav = resemblyzer.preprocess_wav(samples, source_sr=None)
        _, slices = reference_encoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
        assert result.stdout.endswith(f" s, {len(slices)} windows) -> {output}\n")
        embedding = reference_encoder.embed_utterance(wav)
        expected = embedding @ head["head.0.weight"].numpy().T + head["head.0.bias"].numpy()
        prediction = predict_face(voice, load_voice_head(files["head"]), decoder, VoiceHeadSettings())
        assert np.abs(prediction.feature - expected).max() < 1e-4 * np.abs(expected).max()
        with Image.open(output) as image:
            png = np.asarray(image).copy()
        assert np.array_equal(png, prediction.image)
        images.append(png.astype(int))
    assert np.abs(images[0] - images[1]).mean() > 5        # two speakers, two faces


def test_head_and_decoder_of_different_sizes_are_one_line(files, tmp_path) -> None:
    result = run(recordings()[0], tmp_path / "face.png", files["small"], files["decoder"])
    assert result.exit_code == 1 and "not a pair" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "face.png").exists()
