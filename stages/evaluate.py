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
from speech2face.determinism import fix_threads  # noqa: E402
from speech2face.evaluation import EvaluationError  # noqa: E402
from speech2face.intervals import ClusterBootstrap, verdict  # noqa: E402
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


def decoded_faces_section(figures: dict, intervals: dict) -> str:
    """The decoded-face part of summary.md."""
    ks = list(figures["image_R@K"])
    cell = evaluation.cell
    return "\n".join([
        "## Decoded faces (face decoder)", "",
        f"- detected as a face by dlib's HOG detector: {100 * figures['decoded_detected']:.0f}% of faces decoded "
        f"from the true features, {cell(intervals['voice_decoded_detected'], digits=0)}% of faces decoded from "
        f"voices (real test crops: {100 * figures['real_detected']:.0f}%)",
        f"- identity: cosine of the re-embedded decoded face to its own feature "
        f"{cell(intervals['identity_cosine'], scale=1.0, digits=3)}, to other test identities' "
        f"features {figures['other_identity_cosine']:.3f} (real faces of different identities: "
        f"{figures['real_other_identity_cosine']:.3f}); nearest to its own identity: "
        f"{100 * figures['own_is_nearest']:.0f}%",
        "", "Image-level retrieval (voice -> feature -> decoded face -> re-embedded, among the test identities), "
        "recall at K in % with 95 % intervals:", "",
        "| input | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks),
        "| voice | " + " | ".join(cell(intervals["image_R@K"][k]) for k in ks) + " |",
        "| true face feature (decoder only) | " + " | ".join(cell(intervals["decoder_only_R@K"][k]) for k in ks)
        + " |",
        "", "Voice vs chance, image-level: " + "; ".join(
            f"R@{k} {verdict(intervals['image_vs_chance'][k])}" for k in intervals["image_vs_chance"]),
        "", "`decoded_faces.png`: true face, face decoded from the true feature, face decoded from the voice.", ""])


def flat_figures(prefix: str, by_k: dict, name: str = "R@{k}") -> dict[str, float]:
    """{"<prefix>R@1": value, "<prefix>R@1_low": ..., "<prefix>R@1_high": ...} for metrics.json."""
    out = {}
    for k, figure in by_k.items():
        key = prefix + name.format(k=k)
        out.update({key: figure["value"], f"{key}_low": figure["low"], f"{key}_high": figure["high"]})
    return out


def split_predictions(model, pairs, spectrogram_power: float, ridge) -> dict[str, np.ndarray]:
    """{"cnn": encoder features, "ridge": ridge-baseline features} of ``pairs``' voices, checked."""
    pooled = np.stack([evaluation.pooled_log_mel(pairs.spectrogram(i), spectrogram_power) for i in range(len(pairs))])
    predicted = {"cnn": evaluation.predict_features(model, pairs), "ridge": ridge.predict(pooled).astype(np.float32)}
    for name, values in predicted.items():
        evaluation.check_predictions(values, pairs.table["clip_id"].to_numpy(), name)
    return predicted


def run(sampled_gallery_size: int, draws: int, seed: int, examples: int, spectrogram_power: float,
        faces_params: dict, threads: int = 2, replicates: int = 2000) -> dict:
    fix_threads(threads)
    pairs = load_pairs("data/spectrograms", "data/faces")
    train, val, test = pairs.subset("train"), pairs.subset("val"), pairs.subset("test")
    if len(test) == 0 or len(train) == 0:
        raise ParamsError("the split has no test or no train pairs (need more identities)")
    model = load_encoder("models/voice_encoder.pt")
    # Baseline on the same split: ridge regression from pooled log-mel features (fit on train).
    pooled_train = np.stack([evaluation.pooled_log_mel(train.spectrogram(i), spectrogram_power)
                             for i in range(len(train))])
    ridge, ridge_alpha = evaluation.fit_ridge(pooled_train, train.features)

    def evaluate_split(part):
        predicted = split_predictions(model, part, spectrogram_power, ridge)
        identities = part.table["identity"].to_numpy()
        names, gallery, true_index = evaluation.identity_gallery(identities, part.features)
        boot = ClusterBootstrap(identities, replicates=replicates, seed=seed)
        hits = {name: evaluation.retrieval_hits(queries, gallery, true_index, retrieval.PAPER_KS,
                                                sampled_gallery_size, draws, seed)
                for name, queries in predicted.items()}
        return predicted, names, gallery, true_index, boot, hits

    predicted_all, names, gallery, true_index, boot, hits = evaluate_split(test)
    predicted = predicted_all["cnn"]
    n_gallery = len(gallery)
    results = {name: evaluation.with_intervals(h, boot) for name, h in hits.items()}
    chance = {k: retrieval.chance_recall(k, n_gallery) for k in results["cnn"]["cosine"]["whole"]}
    compared = evaluation.comparisons(hits, chance, boot)
    similarity = {name: evaluation.similarity_with_intervals(queries, test.features, boot)
                  for name, queries in predicted_all.items()}
    val_results, val_identities = None, 0
    if len(val):
        _, val_names, _, _, val_boot, val_hits = evaluate_split(val)
        val_results = {name: evaluation.with_intervals(h, val_boot) for name, h in val_hits.items()}
        val_identities = len(val_names)

    metrics = {
        **flat_figures("", results["cnn"]["cosine"]["whole"]),
        **flat_figures("ridge_", results["ridge"]["cosine"]["whole"]),
        **{f"chance_R@{k}": v for k, v in chance.items()},
        **flat_figures("cnn_minus_ridge_", {k: d.as_dict() for k, d in compared["cnn - ridge"].items()}),
        **(flat_figures("val_", val_results["cnn"]["cosine"]["whole"]) if val_results else {}),
        **(flat_figures("val_ridge_", val_results["ridge"]["cosine"]["whole"]) if val_results else {}),
        **flat_figures("cnn_", {"": similarity["cnn"]["cosine_angle_deg"]}, name="cosine_angle_deg"),
        "gallery_identities": n_gallery, "test_queries": len(test), "train_pairs": len(train),
        "val_identities": val_identities, "val_queries": len(val),
        "ridge_alpha": ridge_alpha,
        "details": {"retrieval": results, "validation": val_results, "feature_similarity": similarity,
                    "comparisons": {pair: {k: d.as_dict() for k, d in by_k.items()} for pair, by_k in compared.items()},
                    "bootstrap": {"replicates": replicates, "seed": seed, "unit": "test identity", "level": 0.95}},
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
    decoded, images, per_query = evaluate_decoded_faces(decoder, test.features, test.table["identity"].to_numpy(),
                                                        predicted, gallery, true_index, test_crops, analyzer, backend)
    decoded_intervals = {
        "image_R@K": {k: boot.interval(v).as_dict() for k, v in per_query["image_hits"].items()},
        "decoder_only_R@K": {k: boot.interval(v).as_dict() for k, v in per_query["decoder_only_hits"].items()},
        "identity_cosine": boot.interval(per_query["identity_cosine"]).as_dict(),
        "voice_decoded_detected": boot.interval(per_query["voice_decoded_detected"]).as_dict(),
        "image_vs_chance": {k: boot.difference(per_query["image_hits"][k], chance[k])
                            for k in (1, 5, 10) if k in chance},
    }
    metrics.update({k: v for k, v in decoded.items() if not isinstance(v, dict)})
    metrics.update(flat_figures("image_", decoded_intervals["image_R@K"]))
    metrics["details"]["decoded_faces"] = {**decoded, "intervals": {
        key: value for key, value in decoded_intervals.items() if key != "image_vs_chance"}}
    metrics = round_floats(metrics)
    first_of_identity = {name: i for i, name in reversed(list(enumerate(test.table["identity"])))}
    shown = sorted(first_of_identity.values())[:examples]
    face_grid([[test_crops[i], images["from_true"][i], images["from_voice"][i]] for i in shown],
              REPORTS / "decoded_faces.png", labels=["true face", "from true feature", "from voice"])

    REPORTS.mkdir(exist_ok=True)
    counts = {"test_queries": len(test), "test_identities": n_gallery, "train_pairs": len(train),
              "val_queries": len(val), "val_identities": val_identities}
    (REPORTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (REPORTS / "summary.md").write_text(
        evaluation.summary_markdown(results, val_results, similarity, compared, counts,
                                    metrics["details"]["bootstrap"])
        + "\n" + decoded_faces_section(decoded, decoded_intervals))
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
                                                   "draws": draws, "seed": seed, "threads": threads,
                                                   "bootstrap": replicates}}):
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if not isinstance(v, dict)})
        for name in ("metrics.json", "summary.md", "recall_at_k.csv", "recall_at_k.png", "retrieval_gallery.png",
                     "decoded_faces.png"):
            mlflow.log_artifact(str(REPORTS / name))
    whole = results["cnn"]["cosine"]["whole"]
    line = ", ".join(f"R@{k} {evaluation.cell(whole[k])}% (ridge {100 * results['ridge']['cosine']['whole'][k]['value']:.1f}%, "
                     f"chance {100 * chance[k]:.1f}%)" for k in list(whole)[:3])
    print(f"evaluate: {len(test)} test voices, {n_gallery} identities: {line}; decoded faces: "
          f"{100 * decoded['decoded_detected']:.0f}% detected, identity cosine {decoded['identity_cosine']:.3f} "
          f"(other identities {decoded['other_identity_cosine']:.3f}), image R@1 "
          f"{100 * decoded['image_R@K'][1]:.1f}%", flush=True)
    return metrics


def round_floats(value, digits: int = 6):
    """Every float in a nested structure rounded: the file holds the figures, not float noise."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def main() -> None:
    p = load_section(SECTION)
    run(sampled_gallery_size=get_int(p, SECTION, "sampled_gallery_size", minimum=2),
        draws=get_int(p, SECTION, "draws", minimum=1), seed=get_int(p, SECTION, "seed", minimum=0),
        examples=get_int(p, SECTION, "gallery_examples", minimum=1),
        spectrogram_power=float(load_section("spectrogram")["power"]), faces_params=load_section("faces"),
        threads=get_int(p, SECTION, "threads", minimum=1), replicates=get_int(p, SECTION, "bootstrap", minimum=100))


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, FileNotFoundError, ModelFileError, BackendError, EvaluationError) as error:
        sys.exit(f"evaluate: {error}")
