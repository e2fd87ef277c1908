"""The voice of chosen clips, as the GE2E backbone takes it: extracted audio -> partial mels.

Reads the extract stage's shards (only those holding a wanted clip), prepares each clip's
whole audio as the speaker_embeddings stage does (resemblyzer's volume normalisation and VAD
when ``preprocess``; ``speaker_embeddings.voiced_wav``) and cuts it into GE2E's 1.6 s mel
partials (``VoiceHead``'s input). A clip the VAD empties entirely keeps its raw audio: every
clip that has a spectrogram gets a voice, so the voice head is scored on the same test
voices as the other models. A clip with no audio at all is a ``DataError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from speech2face.core.errors import DataError
from speech2face.data import extract_files
from speech2face.data.speaker_embeddings import voiced_wav
from speech2face.models.voice_head import PartialMels


def clip_wavs(extract_dir: str | Path, clip_ids: list[str], preprocess: bool = True) -> list[np.ndarray]:
    """Float 16 kHz audio of each clip, in the order of ``clip_ids``."""
    wanted, found = set(clip_ids), {}
    for shard in extract_files.downstream_shards(extract_dir):
        needed = [clip_id for clip_id in shard.clip_ids if clip_id in wanted]
        if not needed:
            continue
        source = extract_files.load_shard(Path(extract_dir) / f"{shard.name}.npz")
        position = {clip_id: i for i, clip_id in enumerate(source.clip_ids)}
        for clip_id in needed:
            if clip_id not in position:
                continue
            samples = source.audio_float(position[clip_id])
            wav = voiced_wav(samples, preprocess) if len(samples) else None
            found[clip_id] = wav if wav is not None else (samples if np.any(samples) else None)
    missing = [clip_id for clip_id in clip_ids if found.get(clip_id) is None]
    if missing:
        raise DataError(f"no audio for {len(missing)} clips in {extract_dir} (e.g. {missing[0]}): rerun the "
                        f"extract stage (dvc repro extract)")
    return [found[clip_id] for clip_id in clip_ids]


def clip_partial_mels(extract_dir: str | Path, clip_ids: list[str], preprocess: bool = True) -> PartialMels:
    return PartialMels.of_wavs(clip_wavs(extract_dir, clip_ids, preprocess), clip_ids)
