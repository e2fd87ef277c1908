"""GE2E (speech2face.models.ge2e) against resemblyzer 0.1.4 itself, on real LibriSpeech speech
(../shared/media/speech/librispeech: 10 speakers x 3 utterances, 16 kHz FLAC).

References are resemblyzer's own computations on the same preprocessed audio: its mel
(librosa), its partial slices and its VoiceEncoder.embed_utterance. Measured here: mel max
abs diff 2.9e-6 at values up to 23 (float32 librosa vs float64 torch), embeddings cosine
>= 0.9999999 and max abs diff 1.8e-7 on all 30 utterances. Then the weights must separate
these speakers: measured 100 % nearest-same-speaker and EER 0 %, where a randomly
initialised network gets 30-43 % and EER 43-46 % (seeds 0-4).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from speech2face.evaluation.speaker_check import equal_error_rate, nearest_same_speaker_share, pair_scores
from speech2face.models import ge2e

ROOT = Path(__file__).resolve().parents[2]
LIBRISPEECH = ROOT.parent / "shared" / "media" / "speech" / "librispeech"
FILES = sorted(LIBRISPEECH.glob("*/*.flac"))

with warnings.catch_warnings():
    # resemblyzer 0.1.4 imports binary_dilation from the deprecated scipy.ndimage.morphology
    warnings.simplefilter("ignore", DeprecationWarning)
    resemblyzer = pytest.importorskip("resemblyzer", reason=f"resemblyzer absent ({ge2e.INSTALL_COMMAND})")

pytestmark = [pytest.mark.skipif(not FILES, reason=f"real speech folder {LIBRISPEECH} absent or empty"),
              pytest.mark.usefixtures("one_torch_thread")]

# Thresholds of the speaker test: the pretrained weights give 100 % and 0 %; a randomly
# initialised GE2EEncoder gives 30-43 % and 43-46 % (test_random_weights_fail_the_speaker_test).
MIN_NEAREST_SAME_SPEAKER = 0.9
MAX_EER = 0.05


@pytest.fixture(scope="module")
def utterances() -> list[tuple[str, np.ndarray]]:
    """(speaker, audio preprocessed as GE2E expects) for every file."""
    import soundfile

    found = []
    for path in FILES:
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == ge2e.SAMPLE_RATE
        found.append((path.parent.name, ge2e.preprocess_wav(audio)))
    return found


@pytest.fixture(scope="module")
def model() -> ge2e.GE2EEncoder:
    return ge2e.load_pretrained_ge2e()


@pytest.fixture(scope="module")
def reference_encoder():
    return resemblyzer.VoiceEncoder("cpu", verbose=False)


@pytest.fixture(scope="module")
def embeddings(model, utterances) -> np.ndarray:
    return np.stack([model.embed_utterance(wav) for _, wav in utterances])


def test_mel_filterbank_equals_librosa() -> None:
    import librosa

    expected = librosa.filters.mel(sr=16000, n_fft=400, n_mels=40)   # float32 in librosa
    filters = ge2e.mel_filterbank()
    assert filters.shape == expected.shape == (40, 201)
    assert np.abs(filters - expected).max() < 1e-8   # measured 6.8e-10 (float32 rounding), peaks 0.013


def test_mel_spectrogram_equals_resemblyzer(utterances) -> None:
    for _, wav in utterances:
        expected = resemblyzer.wav_to_mel_spectrogram(wav)
        mel = ge2e.mel_spectrogram(wav)
        assert mel.dtype == np.float32 and mel.shape == expected.shape == (1 + len(wav) // 160, 40)
        np.testing.assert_allclose(mel, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rate", [0.7, 1.3, 2.5])
@pytest.mark.parametrize("n_samples", [0, 1, 400, 16000, 25599, 25600, 25601, 30000, 41600, 45360, 100003])
def test_partial_slices_equal_resemblyzer(n_samples: int, rate: float) -> None:
    _, expected = resemblyzer.VoiceEncoder.compute_partial_slices(n_samples, rate, 0.75)
    assert ge2e.partial_slices(n_samples, rate, 0.75) == expected


def test_partial_slices_refuse_a_rate_that_leaves_gaps() -> None:
    with pytest.raises(ValueError, match="rate 0.5"):
        ge2e.partial_slices(48000, rate=0.5)


def test_forward_equals_resemblyzer_on_a_batch(model, reference_encoder, utterances) -> None:
    mel = ge2e.mel_spectrogram(utterances[0][1])
    batch = torch.from_numpy(np.stack([mel[:160], mel[80:240], mel[-160:]]))
    with torch.no_grad():
        ours, theirs = model(batch), reference_encoder(batch)
    assert ours.shape == (3, 256)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3)) and (ours >= 0).all()


def test_embeddings_equal_resemblyzer(embeddings, reference_encoder, utterances) -> None:
    expected = np.stack([reference_encoder.embed_utterance(wav) for _, wav in utterances])
    cosines = np.sum(embeddings * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert embeddings.shape == (len(FILES), 256)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert cosines.min() > 0.9999          # measured 0.9999999
    assert np.abs(embeddings - expected).max() < 1e-5   # measured 1.8e-7


def test_utterances_embedded_together_equal_one_at_a_time(model, embeddings, utterances) -> None:
    wavs = [wav for _, wav in utterances]
    together = model.embed_utterances(wavs, max_partials=64)   # several passes, partials split across them
    assert together.shape == embeddings.shape and together.dtype == np.float32
    assert np.abs(together - embeddings).max() < 1e-6
    assert model.embed_utterances([]).shape == (0, 256)


def test_embeddings_separate_speakers(embeddings, utterances) -> None:
    speakers = [speaker for speaker, _ in utterances]
    assert len(set(speakers)) == 10
    # chance for the nearest other utterance: 2 / 29 = 7 %
    assert nearest_same_speaker_share(embeddings, speakers) >= MIN_NEAREST_SAME_SPEAKER
    assert equal_error_rate(*pair_scores(embeddings, speakers)) <= MAX_EER


def test_random_weights_fail_the_speaker_test(utterances) -> None:
    """The thresholds above are earned by the trained weights, not by any LSTM over these
    mels (a random one already clusters the recordings somewhat: same chapter, same microphone)."""
    torch.manual_seed(0)
    random_model = ge2e.GE2EEncoder().eval()
    embeddings = np.stack([random_model.embed_utterance(wav) for _, wav in utterances])
    speakers = [speaker for speaker, _ in utterances]
    assert nearest_same_speaker_share(embeddings, speakers) < MIN_NEAREST_SAME_SPEAKER   # measured 0.37
    assert equal_error_rate(*pair_scores(embeddings, speakers)) > MAX_EER                 # measured 0.46


def test_parameters_train_until_frozen(model, utterances) -> None:
    tuned = ge2e.load_pretrained_ge2e()
    assert all(p.requires_grad for p in tuned.parameters())
    partials = tuned.embed_partials(utterances[0][1])
    partials.sum().backward()
    assert tuned.lstm.weight_ih_l0.grad is not None and tuned.lstm.weight_ih_l0.grad.abs().sum() > 0
    assert tuned.freeze() is tuned and not any(p.requires_grad for p in tuned.parameters())
    # loading gives fresh weights: the fixture's model shares nothing with this one
    assert torch.equal(model.linear.weight, tuned.linear.weight)
    assert model.linear.weight.data_ptr() != tuned.linear.weight.data_ptr()


def test_without_resemblyzer_the_errors_name_the_install_command(monkeypatch) -> None:
    # None in sys.modules makes the import machinery treat the package as absent
    monkeypatch.setitem(sys.modules, "resemblyzer", None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps resemblyzer==0.1.4"):
        ge2e.load_pretrained_ge2e()
    with pytest.raises(RuntimeError, match="pip install --no-deps resemblyzer==0.1.4"):
        ge2e.preprocess_wav(np.zeros(16000, np.float32))
