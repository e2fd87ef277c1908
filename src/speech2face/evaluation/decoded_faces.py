"""How good are decoded faces? Re-embedding, detectability, identity, image-level retrieval.

Decoded images are judged by the same tools that made the features, run for real:
- **detectability**: dlib's HOG detector (upsampling 0, then 1) on the 224x224 image; the
  share of images in which it finds a face;
- **re-embedding** with the face backend. ``dlib128`` embeds from landmarks: the 68-point
  predictor runs on the detected face; when no face is detected the decoder's own landmarks
  stand in (so identity is measured on every image, and detectability separately);
  ``vggface4096`` embeds the crop directly (decoded images are in the crop geometry);
- **identity preservation**: cosine between the re-embedded decoded image and the feature
  it was decoded from, against the cosine to the other test identities' features;
- **image-level retrieval** (SF2F's protocol): voice -> predicted feature -> decoded image ->
  re-embedded -> R@K among the real test identities.
"""

from __future__ import annotations

import numpy as np

from speech2face.data.face_analysis import AlignedFace, FaceAnalyzer
from speech2face.evaluation import retrieval
from speech2face.models.face_decoder import decode


def reembed_images(images: np.ndarray, analyzer: FaceAnalyzer, backend, fallback_landmarks: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, S, 3) uint8 -> (features (n, dim) float32, detected (n,) bool)."""
    features = np.zeros((len(images), backend.dim), np.float32)
    detected = np.zeros(len(images), bool)
    for i, image in enumerate(images):
        image = np.ascontiguousarray(image)
        outcome = analyzer.analyse_frame(image, 0.5, 0.5)
        detected[i] = outcome.face is not None
        face = outcome.face
        if face is None:
            points = np.asarray(fallback_landmarks[i], np.float32)
            box = (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()),
                   float(points[:, 1].max()))
            face = AlignedFace(crop=image, landmarks=points, frame_landmarks=points, box=box, frame_index=0,
                               faces_in_frame=0, frame=image)
        if backend.in_worker:
            features[i] = backend.embed([face])[0]
        else:   # crop-based backends: the decoded image is already an aligned crop
            features[i] = backend.embed_crops(image[None])[0]
    return features, detected


def detection_rate(images: np.ndarray, analyzer: FaceAnalyzer) -> float:
    if not len(images):
        return float("nan")
    return float(np.mean([bool(analyzer.detect(np.ascontiguousarray(image))) for image in images]))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return a @ b.T


def identity_preservation(reembedded: np.ndarray, source: np.ndarray, identities: np.ndarray) -> dict:
    """Cosine of each decoded face to its own source feature, against the mean cosine to the
    features of *other* identities (and the real features' own cross-identity cosine).
    ``own_is_nearest``: share of decoded faces nearer (cosine) their own source than any other
    identity's feature (an R@1 over distinct identities)."""
    cos = cosine_matrix(reembedded, source)
    other = identities[None, :] != identities[:, None]
    own = np.diag(cos)
    to_others = np.array([cos[i, other[i]].mean() if other[i].any() else np.nan for i in range(len(cos))])
    nearest_other = np.array([cos[i, other[i]].max() if other[i].any() else -np.inf for i in range(len(cos))])
    real = cosine_matrix(source, source)
    return {"identity_cosine": float(own.mean()), "identity_cosine_std": float(own.std()),
            "other_identity_cosine": float(np.nanmean(to_others)),
            "real_other_identity_cosine": float(real[other].mean()) if other.any() else float("nan"),
            "own_is_nearest": float(np.mean(own > nearest_other))}


def image_retrieval(reembedded_from_voice: np.ndarray, gallery: np.ndarray, true_index: np.ndarray,
                    ks=retrieval.PAPER_KS) -> dict[int, np.ndarray]:
    """Per query, whether its re-embedded voice-decoded face is in the top K (cosine) among
    the gallery identities: {K: 0/1 per query} (R@K is the mean)."""
    ranks = retrieval.true_ranks(reembedded_from_voice, gallery, true_index, "cosine")
    return retrieval.hits_at_k(ranks, ks, len(gallery))


def evaluate_decoded_faces(decoder, test_features: np.ndarray, identities: np.ndarray,
                           predicted_features: np.ndarray, gallery: np.ndarray, true_index: np.ndarray,
                           real_crops: np.ndarray, analyzer: FaceAnalyzer, backend,
                           ks=retrieval.PAPER_KS, matching_draws: int = 10, seed: int = 0
                           ) -> tuple[dict, dict[str, np.ndarray], dict]:
    """All decoded-face figures of the test split, the decoded images, and the per-query
    values behind the figures (for intervals).

    ``test_features``: the real face feature of each test clip; ``predicted_features``: the
    encoder's feature of the same clip's voice; ``gallery``/``true_index``: the identity
    gallery of the retrieval evaluation. Image-level 1:2 matching (voice2face's): the
    re-embedded voice-decoded face against its identity's and an impostor's face feature,
    ``matching_draws`` seeded impostors per query (speech2face.evaluation.retrieval)."""
    from_true, landmarks_true = decode(decoder, test_features)
    from_voice, landmarks_voice = decode(decoder, predicted_features)
    reembedded_true, detected_true = reembed_images(from_true, analyzer, backend, landmarks_true)
    reembedded_voice, detected_voice = reembed_images(from_voice, analyzer, backend, landmarks_voice)
    image_hits = image_retrieval(reembedded_voice, gallery, true_index, ks)
    decoder_only_hits = image_retrieval(reembedded_true, gallery, true_index, ks)
    figures = {
        "decoded_detected": float(detected_true.mean()),
        "voice_decoded_detected": float(detected_voice.mean()),
        "real_detected": detection_rate(real_crops, analyzer),
        **identity_preservation(reembedded_true, test_features, identities),
        "image_R@K": {k: float(v.mean()) for k, v in image_hits.items()},
        "decoder_only_R@K": {k: float(v.mean()) for k, v in decoder_only_hits.items()},
    }
    if len(gallery) > 1:
        image_matching = retrieval.one_in_two_matching(reembedded_voice, gallery, true_index, matching_draws, seed)
        figures["image_matching_1of2"] = float(image_matching.mean())
    per_query = {"image_hits": image_hits, "decoder_only_hits": decoder_only_hits,
                 "identity_cosine": np.diag(cosine_matrix(reembedded_true, test_features)).astype(np.float64),
                 "voice_decoded_detected": detected_voice.astype(np.float64)}
    if len(gallery) > 1:
        per_query["image_matching"] = image_matching
    return figures, {"from_true": from_true, "from_voice": from_voice}, per_query
