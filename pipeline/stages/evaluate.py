"""Stage evaluate: score the fine-tuned and the head-only model *from the test images*, write DVC
metrics and plots, and register the model finetune chose to ship (on validation) as a new
registry version, judged by the promotion gate against the champion on the same test images."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.atomic import write_json, write_text
from pipeline.data import holdout
from pipeline.model.checkpoints import load_classifier, save_checkpoint
from pipeline.model.metrics import classification_report
from pipeline.params import Params, params_hash
from pipeline.progress import say
from pipeline.serving import onnx_export
from pipeline.serving.classifier import MODEL_CODE, PIP_REQUIREMENTS, ImageClassifier, input_example, to_png_bytes
from pipeline.tracking import gate, lineage, logs, registry, runs

MODELS = {"finetuned": paths.FINETUNED_DIR, "head_only": paths.HEAD_DIR}


@dataclass
class Scored:
    folder: Path
    config: dict
    predicted: np.ndarray  # (N,) class index per test image
    report: dict  # classification_report


@dataclass
class TestScores:
    test: pd.DataFrame
    pixels: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray
    models: dict[str, Scored]
    shipped: str  # which model ships: finetune decided, on validation only
    why: str

    @property
    def ship(self) -> Scored:
        return self.models[self.shipped]


def main(params: Params) -> None:
    scores = score_test_split(params.evaluate.batch_size)
    write_per_image_outputs(scores)
    logged = logs.flatten("evaluate", vars(params.evaluate))
    with tempfile.TemporaryDirectory() as tmp, runs.stage_run("evaluate", params.mlflow.experiment, logged) as mlrun:
        log_scores(scores)
        record, message = register_shipped(params, scores, Path(tmp), mlrun.info.run_id)
        lineage.record_run("evaluate", mlrun.info.run_id)
    write_json(paths.stage_metrics("evaluate"), summary(scores, record))
    write_json(paths.DECISION, record)
    ft, head = scores.models["finetuned"].report, scores.models["head_only"].report
    say(f"evaluate: {len(scores.test)} test images — head-only accuracy {head['accuracy']:.4f} "
        f"(macro-F1 {head['macro_f1']:.4f}), fine-tuned accuracy {ft['accuracy']:.4f} "
        f"(macro-F1 {ft['macro_f1']:.4f})\n"
        f"evaluate: ships {scores.shipped} (test accuracy {scores.ship.report['accuracy']:.4f}) — "
        f"chosen on validation: {scores.why}\n{message}")


def score(classifier: ImageClassifier, pixels: np.ndarray, labels: np.ndarray, batch_size: int):
    predicted = classifier.probabilities(pixels, batch_size).argmax(axis=1)
    return predicted, classification_report(labels, predicted, classifier.classes)


def score_test_split(batch_size: int) -> TestScores:
    test, pixels = holdout.load()
    labels = test.label_index.to_numpy()
    models = {}
    for name, folder in MODELS.items():
        classifier = ImageClassifier(folder)
        models[name] = Scored(folder, classifier.config, *score(classifier, pixels, labels, batch_size))
    selection = json.loads(paths.SELECTION.read_text())
    return TestScores(test, pixels, labels, models, selection["shipped"], selection["reason"])


def headline(report: dict) -> dict:
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def summary(scores: TestScores, record: dict) -> dict:
    """metrics/evaluate.json."""
    ft, head = scores.models["finetuned"].report, scores.models["head_only"].report
    out = {
        "test_images": len(scores.test),
        "finetuned": headline(ft),
        "head_only": headline(head),
        "finetune_gain": ft["accuracy"] - head["accuracy"],
        # the model registered for deployment, chosen on validation data before this test
        "shipped": {"model": scores.shipped, **headline(scores.ship.report)},
    }
    if record["champion_version"] is not None and record["champion_accuracy"] is not None:
        # the champion this version was judged against, on the same test images
        out["champion"] = {"version": record["champion_version"], "accuracy": record["champion_accuracy"],
                           "macro_f1": record["champion_macro_f1"]}
    return out


def write_per_image_outputs(scores: TestScores) -> None:
    """Per-class metrics and the confusion plots of both models."""
    write_json(paths.METRICS_DIR / "per_class.json",
               {name: scored.report["per_class"] for name, scored in scores.models.items()})
    for name, scored in scores.models.items():
        classes = scored.config["classes"]
        rows = pd.DataFrame({"actual": scores.test.label, "predicted": [classes[i] for i in scored.predicted]})
        write_text(paths.PLOTS_DIR / f"confusion_{name}.csv", rows.to_csv(index=False))


def log_scores(scores: TestScores) -> None:
    ft, head = scores.models["finetuned"].report, scores.models["head_only"].report
    logs.log_metrics({
        "shipped_test_accuracy": scores.ship.report["accuracy"],
        "shipped_test_macro_f1": scores.ship.report["macro_f1"],
        "test_accuracy": ft["accuracy"], "test_macro_f1": ft["macro_f1"],
        "head_only_test_accuracy": head["accuracy"], "head_only_test_macro_f1": head["macro_f1"],
        "finetune_gain": ft["accuracy"] - head["accuracy"],
    })
    logs.log_dict({"finetuned": ft, "head_only": head}, "evaluation.json")
    logs.set_tags({"shipped": scores.shipped})


def self_contained(folder: Path, out: Path) -> Path:
    """A checkpoint holding every weight. A head-only one stores just the head and names where
    its backbone's weights come from; registered as is, serving it would need that download."""
    model, config = load_classifier(folder)
    if not config.get("head_only"):
        return folder
    save_checkpoint(out, model.state_dict(), {**config, "head_only": False})
    return out


def register_shipped(params: Params, scores: TestScores, tmp: Path, run_id: str) -> tuple[dict, str]:
    """Register the shipped model, judged against the champion on these test images."""
    e = params.evaluate
    folder = self_contained(scores.ship.folder, tmp / "checkpoint")
    weights_sha = hashlib.sha256((folder / paths.WEIGHTS_FILE).read_bytes()).hexdigest()
    test_hash = holdout.split_hash(scores.test)
    correct = scores.ship.predicted == scores.labels

    def judge(champion) -> tuple[gate.Decision, dict[str, str]]:
        champion_report, champion_correct = score_champion(champion, scores, tmp, e.batch_size)
        reason = ("first version" if champion is None else f"champion v{champion.version} has other classes")
        decision = gate.decide(correct, champion_correct, e.significance, e.min_gain, without_champion=reason)
        tags = lineage.version_tags(scores.ship.config, scores.shipped, holdout.data_hash(), params_hash(params),
                                    test_hash, float(correct.mean()), run_id)
        tags["gate.champion_macro_f1"] = str(champion_report["macro_f1"]) if champion_report else ""
        return decision, tags

    pyfunc = registry.Pyfunc(MODEL_CODE, PIP_REQUIREMENTS, input_example(to_png_bytes(scores.pixels[0])))
    # exported before registering: a model whose ONNX file disagrees with it is not registered
    onnx = onnx_export.export_checked(folder, tmp / "onnx" / onnx_export.ONNX_FILE, scores.pixels)
    record, message = registry.register(e.model_name, folder, weights_sha, pyfunc, judge, paths.PROMOTION_LOG)
    registry.attach_to_version(e.model_name, record["version"], tmp / "onnx", "onnx", onnx.tags())
    logs.log_metrics(onnx.metrics())
    return record, f"{message}\nevaluate: {onnx.summary()} (logged as onnx/{onnx_export.ONNX_FILE})"


def score_champion(champion, scores: TestScores, tmp: Path, batch_size: int):
    """(report, per-image correctness) of the champion on *this* test split, so the comparison is
    paired per image; (None, None) without a champion or when it has another label set."""
    if champion is None:
        return None, None
    model = ImageClassifier(registry.download_checkpoint(champion, tmp / "champion"))
    if model.classes != scores.ship.config["classes"]:
        return None, None
    predicted, report = score(model, scores.pixels, scores.labels, batch_size)
    return report, predicted == scores.labels
