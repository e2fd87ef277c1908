"""DVC stage: voice -> face retrieval on the test split (identities never seen in training).

Writes reports/metrics.json (DVC metrics), reports/recall_at_k.csv (DVC plot) and PNGs, and
logs all of it to MLflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from speech2face import evaluation, retrieval, tracking  # noqa: E402
from speech2face.decoder import load_decoder  # noqa: E402
from speech2face.decoder_training import face_grid  # noqa: E402
from speech2face.encoder_io import load_encoder  # noqa: E402
from speech2face.model_files import ModelFileError  # noqa: E402
from speech2face.face_backends import BackendError, make_backend  # noqa: E402
from speech2face.face_evaluation import evaluate_decoded_faces  # noqa: E402
from speech2face.faces import FaceAnalyzer  # noqa: E402
from speech2face.pairs import load_pairs  # noqa: E402
from speech2face.params import ParamsError, get_int, load_section  # noqa: E402
from speech2face.tables import read_table  # noqa: E402

SECTION = "evaluate"
REPORTS = Path("reports")


def load_crop(faces_dir: Path, shard: str, row: int, cache: dict) -> np.ndarray:
    if shard not in cache:
        cache[shard] = np.load(faces_dir / f"crops-{shard.removeprefix('shard-')}.npy", mmap_mode="r")
    return np.asarray(cache[shard][row])


def decoded_faces_section(figures: dict) -> str:
    """The decoded-face part of summary.md."""
    ks = list(figures["image_R@K"])
    return "\n".join([
        "## Decoded faces (face decoder)", "",
        f"- detected as a face by dlib's HOG detector: {100 * figures['decoded_detected']:.0f}% of faces decoded "
        f"from the true features, {100 * figures['voice_decoded_detected']:.0f}% of faces decoded from voices "
        f"(real test crops: {100 * figures['real_detected']:.0f}%)",
        f"- identity: cosine of the re-embedded decoded face to its own feature "
        f"{figures['identity_cosine']:.3f} +- {figures['identity_cosine_std']:.3f}, to other test identities' "
        f"features {figures['other_identity_cosine']:.3f} (real faces of different identities: "
        f"{figures['real_other_identity_cosine']:.3f}); nearest to its own identity: "
        f"{100 * figures['own_is_nearest']:.0f}%",
        "", "Image-level retrieval (voice -> feature -> decoded face -> re-embedded, among the test identities), "
        "recall at K in %:", "",
        "| input | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks),
        "| voice | " + " | ".join(f"{100 * figures['image_R@K'][k]:.1f}" for k in ks) + " |",
        "| true face feature (decoder only) | " + " | ".join(
            f"{100 * figures['decoder_only_R@K'][k]:.1f}" for k in ks) + " |",
        "", "`decoded_faces.png`: true face, face decoded from the true feature, face decoded from the voice.", ""])


def run(sampled_gallery_size: int, draws: int, seed: int, examples: int, spectrogram_power: float,
        faces_params: dict) -> dict:
    pairs = load_pairs("data/spectrograms", "data/faces")
    train, test = pairs.subset("train"), pairs.subset("test")
    if len(test) == 0 or len(train) == 0:
        raise ParamsError("evaluate: the split has no test or no train pairs (need more identities)")
    model = load_encoder("models/voice_encoder.pt")
    predicted = evaluation.predict_features(model, test)
    names, gallery, true_index = evaluation.identity_gallery(test.table["identity"].to_numpy(), test.features)

    # Baseline on the same split: ridge regression from pooled log-mel features.
    pooled = lambda part: np.stack([evaluation.pooled_log_mel(part.spectrogram(i), spectrogram_power)  # noqa: E731
                                    for i in range(len(part))])
    ridge_predicted, ridge_alpha = evaluation.ridge_baseline(pooled(train), train.features, pooled(test))

    results = {
        name: evaluation.retrieval_metrics(queries, gallery, true_index, retrieval.PAPER_KS,
                                           sampled_gallery_size, draws, seed)
        for name, queries in (("cnn", predicted), ("ridge", ridge_predicted))
    }
    similarity = {name: retrieval.feature_similarity(queries, test.features)
                  for name, queries in (("cnn", predicted), ("ridge", ridge_predicted))}
    n_gallery = len(gallery)
    metrics = {
        **{f"R@{k}": v for k, v in results["cnn"]["cosine"]["whole"].items()},
        **{f"ridge_R@{k}": v for k, v in results["ridge"]["cosine"]["whole"].items()},
        **{f"chance_R@{k}": retrieval.chance_recall(k, n_gallery) for k in results["cnn"]["cosine"]["whole"]},
        "gallery_identities": n_gallery, "test_queries": len(test), "train_pairs": len(train),
        "cnn_cosine_angle_deg": similarity["cnn"]["cosine_angle_deg"][0],
        "ridge_alpha": ridge_alpha,
        "details": {"retrieval": results, "feature_similarity": similarity},
    }

    # Decoded faces: detectability, identity, image-level retrieval, a picture.
    cache: dict = {}
    faces_index = read_table("data/faces/index.csv")
    location = {c: (s, int(r)) for c, s, r in zip(faces_index["clip_id"], faces_index["shard"], faces_index["row"])}
    test_crops = np.stack([load_crop(Path("data/faces"), *location[c], cache) for c in test.table["clip_id"]])
    decoder = load_decoder("models/face_decoder.pt")
    analyzer = FaceAnalyzer(detector="hog", upsample=1, crop_size=decoder.image_size, detect_max_side=None,
                            max_centre_offset=None)
    backend = make_backend(faces_params["backend"], faces_params.get("vggface_weights"))
    decoded, images = evaluate_decoded_faces(decoder, test.features, test.table["identity"].to_numpy(), predicted,
                                             gallery, true_index, test_crops, analyzer, backend)
    metrics.update({k: v for k, v in decoded.items() if not isinstance(v, dict)})
    metrics.update({f"image_R@{k}": v for k, v in decoded["image_R@K"].items()})
    metrics["details"]["decoded_faces"] = decoded
    first_of_identity = {name: i for i, name in reversed(list(enumerate(test.table["identity"])))}
    shown = sorted(first_of_identity.values())[:examples]
    face_grid([[test_crops[i], images["from_true"][i], images["from_voice"][i]] for i in shown],
              REPORTS / "decoded_faces.png", labels=["true face", "from true feature", "from voice"])

    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (REPORTS / "summary.md").write_text(evaluation.summary_markdown(results, similarity, n_gallery, len(test),
                                                                    len(train))
                                      + "\n" + decoded_faces_section(decoded))
    table = evaluation.recall_table(results, n_gallery)
    table.pivot(index="k", columns="model", values="recall").reset_index().to_csv(
        REPORTS / "recall_at_k.csv", index=False)
    evaluation.plot_recall(table, REPORTS / "recall_at_k.png",
                           f"voice -> face, {n_gallery} test identities, cosine")

    # Retrieval gallery picture for the first few test voices (one per identity).
    gallery_crops = np.stack([load_crop(Path("data/faces"), *location[test.table["clip_id"][first_of_identity[n]]], cache)
                              for n in names])
    top = retrieval.top_k(predicted[shown], gallery, 5)
    query_crops = np.stack([load_crop(Path("data/faces"), *location[test.table["clip_id"][i]], cache) for i in shown])
    evaluation.plot_gallery([test.table["clip_id"][i] for i in shown], top, true_index[shown], gallery_crops,
                            query_crops, REPORTS / "retrieval_gallery.png")

    import mlflow

    with tracking.start_run("evaluate", {SECTION: {"sampled_gallery_size": sampled_gallery_size,
                                                   "draws": draws, "seed": seed}}):
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if not isinstance(v, dict)})
        for name in ("metrics.json", "summary.md", "recall_at_k.csv", "recall_at_k.png", "retrieval_gallery.png",
                     "decoded_faces.png"):
            mlflow.log_artifact(str(REPORTS / name))
    line = ", ".join(f"R@{k} {100 * v:.1f}% (ridge {100 * results['ridge']['cosine']['whole'][k]:.1f}%, "
                     f"chance {100 * retrieval.chance_recall(k, n_gallery):.1f}%)"
                     for k, v in list(results["cnn"]["cosine"]["whole"].items())[:3])
    print(f"evaluate: {len(test)} test voices, {n_gallery} identities: {line}; decoded faces: "
          f"{100 * decoded['decoded_detected']:.0f}% detected, identity cosine {decoded['identity_cosine']:.3f} "
          f"(other identities {decoded['other_identity_cosine']:.3f}), image R@1 "
          f"{100 * decoded['image_R@K'][1]:.1f}%", flush=True)
    return metrics


def main() -> None:
    p = load_section(SECTION)
    run(sampled_gallery_size=get_int(p, SECTION, "sampled_gallery_size", minimum=2),
        draws=get_int(p, SECTION, "draws", minimum=1), seed=get_int(p, SECTION, "seed", minimum=0),
        examples=get_int(p, SECTION, "gallery_examples", minimum=1),
        spectrogram_power=float(load_section("spectrogram")["power"]), faces_params=load_section("faces"))


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, FileNotFoundError, ModelFileError, BackendError) as error:
        sys.exit(f"evaluate: {error}")
