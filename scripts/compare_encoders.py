"""Which of two voice encoders is better, on the validation split, with a paired interval?

    .venv/bin/python scripts/compare_encoders.py A.pt B.pt [--split val] [--names a b]

A and B are encoder files (``models/voice_encoder.pt`` of two runs) or MLflow URIs
(``runs:/<run id>/model``). Both are evaluated on the same voices of this project's split
(data/spectrograms + data/faces, as `dvc repro` left them) against the same identity
gallery, with the evaluate stage's rules (unit-length features, ties against the model)
and its bootstrap (evaluate.bootstrap replicates over identities, evaluate.seed). Printed:
R@1/5/10 of each and the paired difference A - B with its 95 % interval, in words.

Use it to choose settings without looking at the test split, e.g. after
`dvc exp run -n complex -S encoder.input_mode=complex`, compare
`runs:/<that run's train_encoder id>/model` with the baseline's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from speech2face.evaluation import metrics as evaluation  # noqa: E402
from speech2face.cli import resolve_model  # noqa: E402
from speech2face.core.determinism import fix_threads  # noqa: E402
from speech2face.models.encoder_io import load_encoder  # noqa: E402
from speech2face.evaluation.intervals import ClusterBootstrap, verdict  # noqa: E402
from speech2face.data.pairs import load_pairs  # noqa: E402
from speech2face.core.params import load_config  # noqa: E402
from speech2face.evaluation.evaluate import EvaluateConfig  # noqa: E402

KS = (1, 5, 10)


def compare(encoders: list[str], names: list[str], split: str) -> str:
    settings = load_config(EvaluateConfig, ROOT / "params.yaml")
    fix_threads(settings.threads)
    pairs = load_pairs(ROOT / "data" / "spectrograms", ROOT / "data" / "faces").subset(split)
    if len(pairs) == 0:
        raise SystemExit(f"compare_encoders: the {split} split is empty (run `dvc repro` first)")
    identities = pairs.table["identity"].to_numpy()
    _, gallery, true_index = evaluation.identity_gallery(identities, pairs.features)
    boot = ClusterBootstrap(identities, replicates=settings.bootstrap, seed=settings.seed)
    hits = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, location in zip(names, encoders):
            model = load_encoder(resolve_model(location, name, Path(workdir)))
            predicted = evaluation.predict_features(model, pairs)
            evaluation.check_predictions(predicted, pairs.table["clip_id"].to_numpy(), name)
            hits[name] = evaluation.retrieval_hits(predicted, gallery, true_index, KS,
                                                   sampled_gallery_size=None)["cosine"]["whole"]
    ks = [k for k in KS if k in hits[names[0]]]
    lines = [f"{split} split: {len(pairs)} voices of {len(gallery)} identities; R@K in % (cosine), "
             f"95 % intervals from {settings.bootstrap} bootstrap replicates over identities", "",
             "| encoder | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(evaluation.cell(boot.interval(hits[name][k]).as_dict())
                                                  for k in ks) + " |")
    lines.append("")
    for k in ks:
        lines.append(f"- {names[0]} - {names[1]}, R@{k}: {verdict(boot.difference(hits[names[0]][k], hits[names[1]][k]))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoders", nargs=2, help="two encoder .pt files or MLflow URIs")
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    parser.add_argument("--split", default="val", choices=("val", "test", "train"))
    args = parser.parse_args()
    print(compare(args.encoders, args.names, args.split))


if __name__ == "__main__":
    main()
