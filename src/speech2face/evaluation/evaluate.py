"""The evaluate stage: voice -> face retrieval on the test split (identities never seen in training).

Every figure carries a 95 % interval from a bootstrap over test identities
(speech2face.evaluation.intervals); the validation split gets the same figures, for
choices. Writes, into the reports folder: metrics.json (DVC metrics: the headline figures,
``HEADLINE``, what ``dvc exp show`` lists), metrics_details.json (every other figure and the
nested details; not DVC metrics), summary.md, recall_at_k.csv (DVC plot) and three pictures,
and logs all of it to MLflow. The measures
themselves: speech2face.evaluation.metrics (retrieval, ridge baseline, summary text) and
speech2face.evaluation.decoded_faces (faces decoded from voices).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from speech2face.core import tracking
from speech2face.core.determinism import fix_threads
from speech2face.core.errors import DataError
from speech2face.core.params import setting
from speech2face.core.paths import ProjectPaths
from speech2face.core.pictures import face_grid
from speech2face.core.tables import read_table
from speech2face.data.clip_voices import clip_partial_mels
from speech2face.data.face_analysis import FaceAnalyzer
from speech2face.data.face_backends import make_backend
from speech2face.data.face_files import FaceArrays
from speech2face.data.faces import FacesConfig
from speech2face.data.pairs import Pairs, load_pairs
from speech2face.data.speaker_embeddings import load_speaker_embeddings
from speech2face.evaluation import metrics as evaluation
from speech2face.evaluation import retrieval
from speech2face.evaluation.decoded_faces import evaluate_decoded_faces
from speech2face.evaluation.intervals import ClusterBootstrap, verdict
from speech2face.models.encoder_io import load_encoder
from speech2face.models.face_decoder import load_decoder
from speech2face.models.voice_head import VoiceHead, front_end_preprocess, load_voice_head, predict_clips

REPORT_FILES = ("metrics.json", "metrics_details.json", "summary.md", "recall_at_k.csv", "recall_at_k.png",
                "retrieval_gallery.png", "decoded_faces.png")


def _with_interval(*names: str) -> tuple[str, ...]:
    return tuple(f"{name}{end}" for name in names for end in ("", "_low", "_high"))


# The figures a reader compares experiments on, each with its 95 % interval: the voice
# encoder's R@1/5/10, the ridge baselines', the GE2E voice head's, chance, the validation R@1
# (what choices are made on), 1:2 matching (feature and image level), and the decoded faces
# (image-level R@1, share detected as faces). Where the test split has enough identities,
# the paper's protocol too (``paper_R@K``: random galleries of ``sampled_gallery_size``
# identities, the paper's R@1/2/5/10).
HEADLINE = (_with_interval("R@1", "R@5", "R@10", "paper_R@1", "paper_R@2", "paper_R@5", "paper_R@10",
                           "ridge_R@1", "ridge_R@5", "ridge_R@10", "ridge_ge2e_R@1", "ridge_ge2e_R@5",
                           "ge2e_head_R@1", "ge2e_head_R@5", "ge2e_head_paper_R@1", "val_R@1", "val_ge2e_head_R@1",
                           "image_R@1", "matching_1of2", "ridge_matching_1of2", "ridge_ge2e_matching_1of2",
                           "ge2e_head_matching_1of2", "image_matching_1of2")
            + ("chance_R@1", "chance_R@5", "chance_R@10", "voice_decoded_detected", "test_queries",
               "gallery_identities"))


def split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(headline, details): metrics.json's ``HEADLINE`` keys, in that order, and all the rest."""
    headline = {key: metrics[key] for key in HEADLINE if key in metrics}
    return headline, {key: value for key, value in metrics.items() if key not in headline}


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    SECTION: ClassVar[str] = "evaluate"
    sampled_gallery_size: int = setting(100, minimum=2)   # paper protocol, when the test split has that many identities
    draws: int = setting(10, minimum=1)                   # random galleries per query: paper protocol, 1:2 impostors
    seed: int = setting(0, minimum=0)
    gallery_examples: int = setting(6, minimum=1)         # test voices shown in retrieval_gallery.png
    threads: int = setting(2, minimum=1)                  # torch/BLAS threads: fixed, so the figures are the same anywhere
    bootstrap: int = setting(2000, minimum=100)           # bootstrap replicates of every 95 % interval


@dataclass
class SplitResult:
    """Retrieval on one split: predictions, the identity gallery, hits per model."""
    predicted: dict[str, np.ndarray]      # "cnn" / "ridge" -> (queries, dim)
    names: np.ndarray                     # gallery identities
    gallery: np.ndarray
    true_index: np.ndarray
    boot: ClusterBootstrap
    hits: dict
    matching: dict[str, np.ndarray]       # model -> per query, share of impostors beaten (1:2 matching)


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


def matching_section(figures: RetrievalFigures, decoded_intervals: dict, impostors: int) -> str:
    """The 1:2 matching part of summary.md: feature level per model, image level, vs chance."""
    if not figures.matching:
        return "## 1:2 matching\n\nNeeds at least 2 test identities.\n"
    cell = evaluation.cell
    image = decoded_intervals.get("image_matching_1of2")
    lines = ["## 1:2 matching (test split)", "",
             "Given a voice and two faces, one of them the speaker's, pick the closer face (cosine); accuracy in % "
             f"with 95 % intervals, chance 50 %. Each voice meets its own identity's face feature, paired in turn "
             f"with {impostors} impostor faces drawn (seeded) among the other test identities; a tie counts as "
             "a miss.", "",
             "| model | feature level | validation |", "|---|---|---|"]
    for name, figure in figures.matching.items():
        val = figures.val_matching.get(name) if figures.val_matching else None
        lines.append(f"| {name} | {cell(figure)} | {cell(val) if val else '-'} |")
    if image is not None:
        lines.append(f"| cnn, image level (decoded face re-embedded) | {cell(image)} | - |")
    against_chance = [f"{name} {verdict(d)}" for name, d in figures.matching_vs_chance.items()]
    if image is not None:
        against_chance.append(f"image level {verdict(decoded_intervals['image_matching_vs_chance'])}")
    lines += ["", "Against chance: " + "; ".join(against_chance), ""]
    return "\n".join(lines)


def flat_figures(prefix: str, by_k: dict, name: str = "R@{k}") -> dict[str, float]:
    """{"<prefix>R@1": value, "<prefix>R@1_low": ..., "<prefix>R@1_high": ...} for metrics.json."""
    out = {}
    for k, figure in by_k.items():
        key = prefix + name.format(k=k)
        out.update({key: figure["value"], f"{key}_low": figure["low"], f"{key}_high": figure["high"]})
    return out


@dataclass
class SpeakerBaseline:
    """Ridge regression from a pretrained speaker embedding (GE2E) to the face feature."""
    embeddings: dict[str, np.ndarray]   # clip_id -> (256,)
    ridge: object = None
    alpha: float = float("nan")

    @classmethod
    def fit(cls, embeddings: dict[str, np.ndarray], train: Pairs) -> "SpeakerBaseline":
        baseline = cls(embeddings)
        baseline.ridge, baseline.alpha = evaluation.fit_ridge(baseline.inputs(train), train.features)
        return baseline

    def inputs(self, pairs: Pairs) -> np.ndarray:
        missing = [c for c in pairs.table["clip_id"] if c not in self.embeddings]
        if missing:
            raise DataError(f"no speaker embedding for {len(missing)} clips of the split (e.g. {missing[0]}): "
                            f"rerun the speaker_embeddings stage (dvc repro speaker_embeddings)")
        return np.stack([self.embeddings[c] for c in pairs.table["clip_id"]])


@dataclass
class VoiceHeadModel:
    """The trained voice head (GE2E + head), fed each clip's extracted audio."""
    model: VoiceHead
    extracted: Path
    preprocess: bool

    @classmethod
    def load(cls, path: Path, extracted: Path) -> "VoiceHeadModel":
        return cls(load_voice_head(path), extracted, front_end_preprocess(path))

    def predict(self, pairs: Pairs) -> np.ndarray:
        inputs = clip_partial_mels(self.extracted, list(pairs.table["clip_id"]), self.preprocess)
        return predict_clips(self.model, inputs)


def split_predictions(model, pairs, spectrogram_power: float, ridge, speaker: SpeakerBaseline | None = None,
                      voice_head: VoiceHeadModel | None = None) -> dict[str, np.ndarray]:
    """{"cnn": encoder features, "ridge": ridge on pooled log-mel, "ridge_ge2e": ridge on the
    GE2E embedding, "ge2e_head": the voice head} of ``pairs``' voices, checked."""
    pooled = np.stack([evaluation.pooled_log_mel(pairs.spectrogram(i), spectrogram_power) for i in range(len(pairs))])
    predicted = {"cnn": evaluation.predict_features(model, pairs), "ridge": ridge.predict(pooled).astype(np.float32)}
    if speaker is not None:
        predicted["ridge_ge2e"] = speaker.ridge.predict(speaker.inputs(pairs)).astype(np.float32)
    if voice_head is not None:
        predicted["ge2e_head"] = voice_head.predict(pairs)
    for name, values in predicted.items():
        evaluation.check_predictions(values, pairs.table["clip_id"].to_numpy(), name)
    return predicted


def evaluate_split(part: Pairs, model, ridge, spectrogram_power: float, config: EvaluateConfig,
                   speaker: SpeakerBaseline | None = None, voice_head: VoiceHeadModel | None = None) -> SplitResult:
    predicted = split_predictions(model, part, spectrogram_power, ridge, speaker, voice_head)
    identities = part.table["identity"].to_numpy()
    names, gallery, true_index = evaluation.identity_gallery(identities, part.features)
    boot = ClusterBootstrap(identities, replicates=config.bootstrap, seed=config.seed)
    hits = {name: evaluation.retrieval_hits(queries, gallery, true_index, retrieval.PAPER_KS,
                                            config.sampled_gallery_size, config.draws, config.seed)
            for name, queries in predicted.items()}
    matching = {name: retrieval.one_in_two_matching(queries, gallery, true_index, config.draws, config.seed)
                for name, queries in predicted.items()} if len(gallery) > 1 else {}
    return SplitResult(predicted, names, gallery, true_index, boot, hits, matching)


MATCHING_CHANCE = 0.5   # 1:2 matching: pick one of two faces


@dataclass
class RetrievalFigures:
    """R@K with intervals on the test split (and validation), the comparisons, similarity."""
    results: dict
    val_results: dict | None
    val_identities: int
    chance: dict[int, float]
    compared: dict
    similarity: dict
    matching: dict             # model -> 1:2 matching accuracy with interval (test split)
    matching_vs_chance: dict   # model -> paired difference from chance (0.5)
    val_matching: dict | None


def retrieval_figures(test: Pairs, tested: SplitResult, validated: SplitResult | None) -> RetrievalFigures:
    boot = tested.boot
    results = {name: evaluation.with_intervals(h, boot) for name, h in tested.hits.items()}
    chance = {k: retrieval.chance_recall(k, len(tested.gallery)) for k in results["cnn"]["cosine"]["whole"]}
    compared = evaluation.comparisons(tested.hits, chance, boot)
    similarity = {name: evaluation.similarity_with_intervals(queries, test.features, boot)
                  for name, queries in tested.predicted.items()}
    val_results = (None if validated is None else
                   {name: evaluation.with_intervals(h, validated.boot) for name, h in validated.hits.items()})
    matching = {name: boot.interval(v).as_dict() for name, v in tested.matching.items()}
    matching_vs_chance = {name: boot.difference(v, MATCHING_CHANCE) for name, v in tested.matching.items()}
    val_matching = (None if validated is None else
                    {name: validated.boot.interval(v).as_dict() for name, v in validated.matching.items()})
    return RetrievalFigures(results, val_results, 0 if validated is None else len(validated.names), chance,
                            compared, similarity, matching, matching_vs_chance, val_matching)


def paper_protocol_figures(results: dict) -> dict[str, float]:
    """``paper_R@1``... (the encoder), ``<model>_paper_R@1``... (the others): the paper's
    R@1/2/5/10 in random galleries (cosine), for every model that has them (the test split
    had ``sampled_gallery_size`` identities or more); nothing otherwise."""
    return {key: value for name, result in results.items() if result["cosine"]["sampled"]
            for key, value in flat_figures("paper_" if name == "cnn" else f"{name}_paper_",
                                           {k: result["cosine"]["sampled"][k] for k in (1, 2, 5, 10)}).items()}


def metrics_of(figures: RetrievalFigures, counts: dict, ridge_alpha: dict[str, float],
               config: EvaluateConfig) -> dict:
    """metrics.json's retrieval part: flat keys with _low/_high for `dvc metrics`, then details."""
    results, val_results, compared = figures.results, figures.val_results, figures.compared
    return {
        **flat_figures("", results["cnn"]["cosine"]["whole"]),
        **flat_figures("ridge_", results["ridge"]["cosine"]["whole"]),
        **(flat_figures("ridge_ge2e_", results["ridge_ge2e"]["cosine"]["whole"]) if "ridge_ge2e" in results else {}),
        **(flat_figures("ge2e_head_", results["ge2e_head"]["cosine"]["whole"]) if "ge2e_head" in results else {}),
        **{f"chance_R@{k}": v for k, v in figures.chance.items()},
        **paper_protocol_figures(results),
        **flat_figures("cnn_minus_ridge_", {k: d.as_dict() for k, d in compared["cnn - ridge"].items()}),
        **(flat_figures("val_", val_results["cnn"]["cosine"]["whole"]) if val_results else {}),
        **(flat_figures("val_ridge_", val_results["ridge"]["cosine"]["whole"]) if val_results else {}),
        **{key: value for name in ("ridge_ge2e", "ge2e_head") if val_results and name in val_results
           for key, value in flat_figures(f"val_{name}_", val_results[name]["cosine"]["whole"]).items()},
        **flat_figures("cnn_", {"": figures.similarity["cnn"]["cosine_angle_deg"]}, name="cosine_angle_deg"),
        **{key: value for name, figure in figures.matching.items()
           for key, value in flat_figures("" if name == "cnn" else f"{name}_", {"": figure}, "matching_1of2").items()},
        **(flat_figures("val_", {"": figures.val_matching["cnn"]}, "matching_1of2") if figures.val_matching else {}),
        "gallery_identities": counts["test_identities"], "test_queries": counts["test_queries"],
        "train_pairs": counts["train_pairs"], "val_identities": counts["val_identities"],
        "val_queries": counts["val_queries"],
        **{f"{name}_alpha": alpha for name, alpha in ridge_alpha.items()},
        "details": {"retrieval": results, "validation": val_results, "feature_similarity": figures.similarity,
                    "comparisons": {pair: {k: d.as_dict() for k, d in by_k.items()} for pair, by_k in compared.items()},
                    "matching_1of2": {"test": figures.matching, "validation": figures.val_matching,
                                      "minus_chance": {name: d.as_dict()
                                                       for name, d in figures.matching_vs_chance.items()},
                                      "impostors_per_query": config.draws, "chance": MATCHING_CHANCE},
                    "bootstrap": {"replicates": config.bootstrap, "seed": config.seed, "unit": "test identity",
                                  "level": 0.95}},
    }


class TestCrops:
    """The stored face crop of any clip (data/faces)."""

    def __init__(self, faces_dir: Path):
        self.arrays = FaceArrays(faces_dir)
        index = read_table(Path(faces_dir) / "index.csv")
        self.location = {c: (s, int(r)) for c, s, r in zip(index["clip_id"], index["shard"], index["row"])}

    def __call__(self, clip_id: str) -> np.ndarray:
        return self.arrays.row("crops", *self.location[clip_id])


def decoded_face_figures(test: Pairs, tested: SplitResult, test_crops: np.ndarray, chance: dict[int, float],
                         faces_config: FacesConfig, decoder_path: Path, config: EvaluateConfig
                         ) -> tuple[dict, dict, dict]:
    """Faces decoded from the voices and from the true features: (figures, their intervals,
    the images)."""
    decoder = load_decoder(decoder_path)
    analyzer = FaceAnalyzer(detector="hog", upsample=1, crop_size=decoder.image_size, detect_max_side=None,
                            max_centre_offset=None)
    backend = make_backend(faces_config.backend, faces_config.vggface_weights)
    decoded, images, per_query = evaluate_decoded_faces(
        decoder, test.features, test.table["identity"].to_numpy(), tested.predicted["cnn"], tested.gallery,
        tested.true_index, test_crops, analyzer, backend, matching_draws=config.draws, seed=config.seed)
    boot = tested.boot
    intervals = {
        "image_R@K": {k: boot.interval(v).as_dict() for k, v in per_query["image_hits"].items()},
        "decoder_only_R@K": {k: boot.interval(v).as_dict() for k, v in per_query["decoder_only_hits"].items()},
        "identity_cosine": boot.interval(per_query["identity_cosine"]).as_dict(),
        "voice_decoded_detected": boot.interval(per_query["voice_decoded_detected"]).as_dict(),
        **({"image_matching_1of2": boot.interval(per_query["image_matching"]).as_dict(),
            "image_matching_vs_chance": boot.difference(per_query["image_matching"], MATCHING_CHANCE)}
           if "image_matching" in per_query else {}),
        "image_vs_chance": {k: boot.difference(per_query["image_hits"][k], chance[k])
                            for k in (1, 5, 10) if k in chance},
    }
    return decoded, intervals, images


def run_evaluate(config: EvaluateConfig, spectrogram_power: float, faces_config: FacesConfig,
                 paths: ProjectPaths) -> dict:
    """The evaluate stage; returns metrics.json's content."""
    fix_threads(config.threads)
    pairs = load_pairs(paths.spectrograms, paths.faces)
    train, val, test = pairs.subset("train"), pairs.subset("val"), pairs.subset("test")
    if len(test) == 0 or len(train) == 0:
        raise DataError("the split has no test or no train pairs (need more identities)")
    model = load_encoder(paths.encoder)
    # Baseline on the same split: ridge regression from pooled log-mel features (fit on train).
    pooled_train = np.stack([evaluation.pooled_log_mel(train.spectrogram(i), spectrogram_power)
                             for i in range(len(train))])
    ridge, ridge_alpha = evaluation.fit_ridge(pooled_train, train.features)
    # Baseline from a pretrained speaker backbone: ridge from the GE2E embedding (fit on train).
    speaker = SpeakerBaseline.fit(load_speaker_embeddings(paths.speaker_embeddings), train)
    # The pretrained backbone with a head trained on the encoder's loss (train_voice_head).
    voice_head = VoiceHeadModel.load(paths.voice_head, paths.extracted)

    tested = evaluate_split(test, model, ridge, spectrogram_power, config, speaker, voice_head)
    validated = (evaluate_split(val, model, ridge, spectrogram_power, config, speaker, voice_head) if len(val)
                 else None)
    figures = retrieval_figures(test, tested, validated)
    counts = {"test_queries": len(test), "test_identities": len(tested.gallery), "train_pairs": len(train),
              "val_queries": len(val), "val_identities": figures.val_identities}
    metrics = metrics_of(figures, counts, {"ridge": ridge_alpha, "ridge_ge2e": speaker.alpha}, config)

    crop_of = TestCrops(paths.faces)
    test_crops = np.stack([crop_of(c) for c in test.table["clip_id"]])
    decoded, decoded_intervals, images = decoded_face_figures(test, tested, test_crops, figures.chance,
                                                              faces_config, paths.decoder, config)
    metrics.update({k: v for k, v in decoded.items() if not isinstance(v, dict)})
    metrics.update(flat_figures("image_", decoded_intervals["image_R@K"]))
    if "image_matching_1of2" in decoded_intervals:
        metrics.update(flat_figures("image_", {"": decoded_intervals["image_matching_1of2"]}, "matching_1of2"))
    metrics["details"]["decoded_faces"] = {**decoded, "intervals": {
        key: (value.as_dict() if key == "image_matching_vs_chance" else value)
        for key, value in decoded_intervals.items() if key != "image_vs_chance"}}
    metrics = round_floats(metrics)

    write_reports(paths.reports, metrics, figures, counts, decoded, decoded_intervals, test, tested, test_crops,
                  images, crop_of, config.gallery_examples)
    log_run(config, metrics, paths.reports, paths.encoder.parent)
    whole = figures.results["cnn"]["cosine"]["whole"]
    line = ", ".join(f"R@{k} {evaluation.cell(whole[k])}% (ridge "
                     f"{100 * figures.results['ridge']['cosine']['whole'][k]['value']:.1f}%, "
                     f"chance {100 * figures.chance[k]:.1f}%)" for k in list(whole)[:3])
    for name, label in (("ridge_ge2e", "ridge on GE2E"), ("ge2e_head", "GE2E + head")):
        if name in figures.results:
            line += f"; {label} R@1 {evaluation.cell(figures.results[name]['cosine']['whole'][1])}%"
    if figures.matching:
        line += f"; 1:2 matching {evaluation.cell(figures.matching['cnn'])}% (chance 50%)"
    print(f"evaluate: {len(test)} test voices, {len(tested.gallery)} identities: {line}; decoded faces: "
          f"{100 * decoded['decoded_detected']:.0f}% detected, identity cosine {decoded['identity_cosine']:.3f} "
          f"(other identities {decoded['other_identity_cosine']:.3f}), image R@1 "
          f"{100 * decoded['image_R@K'][1]:.1f}%", flush=True)
    return metrics


def write_reports(reports: Path, metrics: dict, figures: RetrievalFigures, counts: dict, decoded: dict,
                  decoded_intervals: dict, test: Pairs, tested: SplitResult, test_crops: np.ndarray,
                  images: dict, crop_of: TestCrops, examples: int) -> None:
    """metrics.json + metrics_details.json, summary.md, recall_at_k.csv/png and the two pictures of faces."""
    first_of_identity = {name: i for i, name in reversed(list(enumerate(test.table["identity"])))}
    shown = sorted(first_of_identity.values())[:examples]
    face_grid([[test_crops[i], images["from_true"][i], images["from_voice"][i]] for i in shown],
              reports / "decoded_faces.png", labels=["true face", "from true feature", "from voice"])

    reports.mkdir(exist_ok=True)
    impostors = metrics["details"]["matching_1of2"]["impostors_per_query"]
    headline, details = split_metrics(metrics)
    (reports / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")
    (reports / "metrics_details.json").write_text(json.dumps(details, indent=2) + "\n")
    (reports / "summary.md").write_text(
        evaluation.summary_markdown(figures.results, figures.val_results, figures.similarity, figures.compared,
                                    counts, metrics["details"]["bootstrap"])
        + "\n" + matching_section(figures, decoded_intervals, impostors)
        + "\n" + decoded_faces_section(decoded, decoded_intervals))
    n_gallery = len(tested.gallery)
    table = evaluation.recall_table(figures.results, n_gallery)
    table.pivot(index="k", columns="model", values="recall").reset_index().to_csv(
        reports / "recall_at_k.csv", index=False)
    evaluation.plot_recall(table, reports / "recall_at_k.png",
                           f"voice -> face, {n_gallery} test identities, cosine")

    # Retrieval gallery picture for the first few test voices (one per identity).
    gallery_crops = np.stack([crop_of(test.table["clip_id"][first_of_identity[n]]) for n in tested.names])
    top = retrieval.top_k(tested.predicted["cnn"][shown], tested.gallery, 5)
    query_crops = np.stack([crop_of(test.table["clip_id"][i]) for i in shown])
    evaluation.plot_gallery([test.table["clip_id"][i] for i in shown], top, tested.true_index[shown], gallery_crops,
                            query_crops, reports / "retrieval_gallery.png")


REGISTERED_MODEL = "speech2face"
MODEL_CODE = Path(__file__).resolve().parents[1] / "mlflow_model.py"


def log_run(config: EvaluateConfig, metrics: dict, reports: Path, models_dir: Path) -> None:
    """The evaluate run (nested under its pipeline run, with every param): the figures, the
    reports, and the encoder + decoder as one MLflow model, registered as a version of
    ``speech2face`` tagged with its R@K. The figures go on the pipeline run too."""
    import mlflow

    figures = {k.replace("@", "_at_"): v for k, v in metrics.items() if not isinstance(v, dict)}
    with tracking.start_run("evaluate") as parent:
        mlflow.log_metrics(figures)
        for name in REPORT_FILES:
            mlflow.log_artifact(str(reports / name))
        with tracking.quiet_artifacts():
            logged = mlflow.pyfunc.log_model(
                name="voice_to_face", python_model=str(MODEL_CODE), artifacts={"models": str(models_dir)},
                pip_requirements=["speech2face"], registered_model_name=REGISTERED_MODEL)
        client = mlflow.MlflowClient()
        version = str(logged.registered_model_version)
        for key in ("R_at_1", "R_at_5", "R_at_10"):
            if key in figures:
                client.set_model_version_tag(REGISTERED_MODEL, version, key, f"{figures[key]:.4f}")
        client.set_model_version_tag(REGISTERED_MODEL, version, "dvc_experiment", tracking.dvc_experiment())
    tracking.log_to_pipeline_run(parent, figures)


def round_floats(value, digits: int = 6):
    """Every float in a nested structure rounded: the file holds the figures, not float noise."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value
