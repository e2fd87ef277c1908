"""The voice head (GE2E backbone + MLP) and its training, on real LibriSpeech speech
(../shared/media/speech/librispeech: 10 speakers x 3 utterances).

- With the backbone frozen, a clip's utterance embedding (partials summed per clip in one
  batch, normalised) equals GE2E's own ``embed_utterances`` (mean per clip, numpy), and a
  batch of some clips equals the same clips within the whole set.
- Frozen means frozen: training moves the head only; fine-tuning moves the LSTM too.
- It learns: "face features" that are a random vector per speaker, trained on two
  utterances of each speaker, are recovered from the third (R@1 among 10 speakers far above
  the 10 % of chance), and validation picks the kept epoch.
- A killed run resumes to the same weights; files round-trip and bad files are one line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.core.model_files import ModelFileError
from speech2face.models import ge2e
from speech2face.models.losses import EncoderLoss
from speech2face.models.voice_head import (PartialMels, VoiceHead, is_voice_head, load_voice_head, predict_clips,
                                           save_voice_head, utterance_embeddings)
from speech2face.training.voice_head import VoiceHeadConfig, train_voice_head

ROOT = Path(__file__).resolve().parents[2]
LIBRISPEECH = ROOT.parent / "shared" / "media" / "speech" / "librispeech"
FILES = sorted(LIBRISPEECH.glob("*/*.flac"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("resemblyzer", reason=f"resemblyzer absent ({ge2e.INSTALL_COMMAND})")

pytestmark = [pytest.mark.skipif(not FILES, reason=f"real speech folder {LIBRISPEECH} absent or empty"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def speech() -> tuple[list[str], list[np.ndarray]]:
    """(speaker of each file, its audio preprocessed as GE2E expects)."""
    import soundfile

    speakers, wavs = [], []
    for path in FILES:
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == ge2e.SAMPLE_RATE
        speakers.append(path.parent.name)
        wavs.append(ge2e.preprocess_wav(audio))
    return speakers, wavs


@pytest.fixture(scope="module")
def inputs(speech) -> PartialMels:
    _, wavs = speech
    return PartialMels.of_wavs(wavs, [f.stem for f in FILES])


def test_frozen_backbone_embeds_as_ge2e_does(speech, inputs) -> None:
    _, wavs = speech
    backbone = ge2e.load_pretrained_ge2e()
    reference = backbone.embed_utterances(wavs)                    # numpy mean per clip, normalised
    model = VoiceHead(out_dim=8, hidden=16, freeze_backbone=True, backbone=backbone)
    embedded = utterance_embeddings(model, inputs, clips_per_batch=7).numpy()
    assert embedded.shape == (len(FILES), ge2e.EMBEDDING_SIZE)
    assert np.abs(embedded - reference).max() < 1e-6
    # the clips of a batch are found again whatever the others are
    chosen = np.array([20, 3, 11])
    alone = model.utterance_embeddings(*inputs.batch(chosen)).detach().numpy()
    assert np.abs(alone - reference[chosen]).max() < 1e-6
    assert inputs.owner.max() == len(FILES) - 1 and np.all(np.diff(inputs.owner) >= 0)


def speaker_features(speakers: list[str], dim: int = 16, seed: int = 0) -> np.ndarray:
    """A random unit 'face feature' per speaker, plus a common component (as real face features have)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(speakers))
    table = rng.normal(size=(len(names), dim)).astype(np.float32)
    table = table / np.linalg.norm(table, axis=1, keepdims=True) + 1.0
    return table[[names.index(s) for s in speakers]]


def split(speech, inputs):
    """Train: the first two utterances of each speaker; validation: the third."""
    speakers, wavs = speech
    features = speaker_features(speakers)
    third = np.array([i % 3 == 2 for i in range(len(speakers))])
    sub = lambda keep: PartialMels.of_wavs([w for w, k in zip(wavs, keep) if k],   # noqa: E731
                                           [c for c, k in zip(inputs.clip_ids, keep) if k])
    return sub(~third), features[~third], sub(third), features[third], np.array(speakers)[third]


def config(**overrides) -> VoiceHeadConfig:
    return VoiceHeadConfig(**{**dict(epochs=30, batch_size=8, lr=3e-3, hidden=64, seed=0, threads=1), **overrides})


LOSS = EncoderLoss(fdec_weight=0.0, lambda1=1.0, lambda2=0.0, feature_l1_weight=0.1)


def test_head_learns_speakers_from_the_frozen_backbone(speech, inputs, tmp_path) -> None:
    train_x, train_y, val_x, val_y, val_speakers = split(speech, inputs)
    model, history = train_voice_head(config(), train_x, train_y, val_x, val_y, tmp_path / "last.pt", LOSS)
    assert len(history) == 30 and history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    predicted = predict_clips(model, val_x)
    gallery = np.unique(val_y, axis=0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
    nearest = np.argmax(unit(predicted) @ unit(gallery).T, axis=1)
    truth = [int(np.flatnonzero((gallery == row).all(axis=1))[0]) for row in val_y]
    recall_at_1 = float(np.mean(nearest == np.array(truth)))
    assert len(gallery) == 10 and recall_at_1 >= 0.7, recall_at_1        # chance: 10 %
    # the kept weights are those of the best validation epoch
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    kept = float(LOSS.terms(torch.from_numpy(val_y), torch.from_numpy(predicted))["total"])
    assert kept == pytest.approx(history[best]["val_loss"], rel=1e-4)


def test_frozen_moves_only_the_head_and_fine_tuning_moves_the_lstm(speech, inputs, tmp_path) -> None:
    train_x, train_y, val_x, val_y, _ = split(speech, inputs)
    pretrained = ge2e.load_pretrained_ge2e().state_dict()
    for freeze, folder in ((True, "frozen"), (False, "tuned")):
        model, _ = train_voice_head(config(epochs=2, freeze_backbone=freeze, backbone_lr=1e-3), train_x, train_y,
                                    None, None, tmp_path / folder / "last.pt", LOSS)
        moved = max(float((model.backbone.state_dict()[k] - v).abs().max()) for k, v in pretrained.items())
        assert (moved == 0.0) if freeze else (moved > 1e-4), (freeze, moved)
        assert all(not p.requires_grad for p in model.backbone.parameters()) == freeze


def test_killed_run_resumes_to_the_same_weights(speech, inputs, tmp_path) -> None:
    train_x, train_y, val_x, val_y, _ = split(speech, inputs)
    straight, _ = train_voice_head(config(epochs=4), train_x, train_y, val_x, val_y, tmp_path / "a" / "last.pt", LOSS)
    train_voice_head(config(epochs=2), train_x, train_y, val_x, val_y, tmp_path / "b" / "last.pt", LOSS)
    resumed, history = train_voice_head(config(epochs=4), train_x, train_y, val_x, val_y, tmp_path / "b" / "last.pt",
                                        LOSS)
    assert len(history) == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_files_round_trip_and_bad_files_are_one_line(inputs, tmp_path) -> None:
    model = VoiceHead(out_dim=8, hidden=0, freeze_backbone=False, backbone=ge2e.load_pretrained_ge2e())
    path = tmp_path / "voice_head.pt"
    save_voice_head(model, path, preprocess=True)
    assert is_voice_head(path) and not is_voice_head(tmp_path / "absent.pt")
    loaded = load_voice_head(path)
    assert loaded.hidden == 0 and loaded.freeze_backbone is False
    assert np.array_equal(predict_clips(loaded, inputs), predict_clips(model, inputs))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["front_end"] == {"preprocess": True, "sample_rate": 16000, "n_mels": 40, "partial_frames": 160,
                                 "partials_per_second": 1.3}
    for bad in ({**meta, "hidden": 10 ** 9}, {**meta, "kind": "table1"}, {**meta, "out_dim": 9}):
        path.with_suffix(".json").write_text(json.dumps(bad))
        with pytest.raises(ModelFileError) as error:
            load_voice_head(path)
        assert "\n" not in str(error.value)
