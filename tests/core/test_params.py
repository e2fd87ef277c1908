"""One typed config per params.yaml section: defaults equal params.yaml, one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from speech2face.core.params import ParamsError, as_params, build_config, load_config
from speech2face.data.download import DownloadConfig
from speech2face.data.extract import ExtractConfig
from speech2face.data.faces import FacesConfig
from speech2face.data.speaker_embeddings import SpeakerEmbeddingsConfig
from speech2face.data.spectrogram import SpectrogramConfig
from speech2face.evaluation.evaluate import EvaluateConfig
from speech2face.training.decoder import DecoderConfig
from speech2face.training.encoder import EncoderConfig
from speech2face.training.voice_head import VoiceHeadConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (DownloadConfig, ExtractConfig, SpectrogramConfig, SpeakerEmbeddingsConfig, FacesConfig, DecoderConfig,
           EncoderConfig, VoiceHeadConfig, EvaluateConfig)


def test_every_section_has_a_config_whose_defaults_are_params_yaml() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(cls.SECTION for cls in CONFIGS) == sorted(params)
    for cls in CONFIGS:
        assert as_params(cls()) == params[cls.SECTION], cls.__name__
        assert load_config(cls, ROOT / "params.yaml") == cls(), cls.__name__


def test_absent_keys_take_defaults_and_types_are_converted() -> None:
    config = build_config(SpectrogramConfig, {"seconds": 3, "power": 1})
    assert (config.seconds, config.power, config.hop) == (3.0, 1.0, 160)
    assert isinstance(config.seconds, float)
    faces = build_config(FacesConfig, {"split_fractions": [1, 0, 0], "detect_max_side": None})
    assert faces.split_fractions == (1.0, 0.0, 0.0) and faces.detect_max_side is None


@pytest.mark.parametrize("cls, values, message", [
    (ExtractConfig, {"shard_sise": 8}, "extract.shard_sise = 8: expected a known key (one of ["),
    (ExtractConfig, {"shard_size": 0}, "extract.shard_size = 0: expected an integer >= 1"),
    (ExtractConfig, {"shard_size": 2.5}, "extract.shard_size = 2.5: expected an integer >= 1"),
    (ExtractConfig, {"shard_size": True}, "extract.shard_size = True: expected an integer >= 1"),
    (ExtractConfig, {"shard_size": None}, "extract.shard_size = None: expected an integer >= 1"),
    (ExtractConfig, {"engine": "spark"}, "extract.engine = 'spark': expected one of ['local', 'dask']"),
    (SpectrogramConfig, {"power": "0.3"}, "spectrogram.power = '0.3': expected a number >= 0.01"),
    (SpectrogramConfig, {"n_fft": 256}, "spectrogram.n_fft = 256: expected an integer >= window (400)"),
    (SpeakerEmbeddingsConfig, {"backbone": "ecapa"}, "speaker_embeddings.backbone = 'ecapa': expected one of"),
    (SpeakerEmbeddingsConfig, {"preprocess": "no"}, "speaker_embeddings.preprocess = 'no': expected true or false"),
    (FacesConfig, {"upsample": 4}, "faces.upsample = 4: expected an integer from 0 to 3"),
    (FacesConfig, {"max_centre_offset": 0}, "faces.max_centre_offset = 0: expected a number > 0"),
    (FacesConfig, {"split_fractions": "0.7"}, "faces.split_fractions = '0.7': expected [train, val, test]"),
    (FacesConfig, {"split_by": "speaker"}, "faces.split_by = 'speaker': expected one of ['video', 'csv']"),
    (FacesConfig, {"split_by": "csv", "test_csv": "/absent/avspeech_test.csv"},
     "faces.test_csv = '/absent/avspeech_test.csv': expected an existing AVSpeech-format CSV"),
    (DownloadConfig, {"allow_file_urls": "yes"}, "download.allow_file_urls = 'yes': expected true or false"),
    (EncoderConfig, {"beta2": 1.5}, "encoder.beta1"),   # beta checks name beta1 (both must be in (0, 1))
    (DecoderConfig, {"identity_net": "arcface"}, "decoder.identity_net = 'arcface': expected one of"),
    (VoiceHeadConfig, {"backbone": "table1"}, "voice_head.backbone = 'table1': expected one of ['ge2e']"),
    (VoiceHeadConfig, {"freeze_backbone": "yes"}, "voice_head.freeze_backbone = 'yes': expected true or false"),
    (VoiceHeadConfig, {"hidden": -1}, "voice_head.hidden = -1: expected an integer >= 0"),
    (VoiceHeadConfig, {"backbone_lr": 0}, "voice_head.backbone_lr = 0: expected a number > 0"),
    (EvaluateConfig, {"bootstrap": 10}, "evaluate.bootstrap = 10: expected an integer >= 100"),
])
def test_bad_values_are_one_line(cls, values, message) -> None:
    with pytest.raises(ParamsError) as caught:
        build_config(cls, values)
    text = str(caught.value)
    assert text.startswith("params.yaml: ") and message in text and "\n" not in text


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExtractConfig().workers = 3


def test_missing_params_file_or_section(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_config(ExtractConfig, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("download: {}\n")
    with pytest.raises(ParamsError, match="section 'extract' missing"):
        load_config(ExtractConfig, tmp_path / "params.yaml")
