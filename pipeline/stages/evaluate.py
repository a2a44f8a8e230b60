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
from pipeline.devices import select_runtime
from pipeline.model.calibration import (
    CalibrationSummary,
    fit_temperature,
    logits_from_probabilities,
    summarize_calibration,
)
from pipeline.model.checkpoints import load_classifier, save_checkpoint
from pipeline.model.metrics import classification_report
from pipeline.params import Params, params_hash
from pipeline.progress import say
from pipeline.reporting import figures
from pipeline.reporting.calibration_plot import calibration_diagram
from pipeline.reporting.saliency import MAX_SALIENCY_IMAGES, saliency_grid
from pipeline.serving import onnx_export
from pipeline.serving.classifier import MODEL_CODE, PIP_REQUIREMENTS, ImageClassifier, input_example, to_png_bytes
from pipeline.tracking import gate, lineage, logs, preflight, registry, runs

MODELS = {"finetuned": paths.FINETUNED_DIR, "head_only": paths.HEAD_DIR}


@dataclass
class Scored:
    folder: Path
    config: dict
    predicted: np.ndarray  # (N,) class index per test image
    report: dict  # classification_report
    probabilities: np.ndarray  # (N, classes)
    classifier: ImageClassifier  # what scored them, as serving runs it


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
    preflight.check_reachable(params.mlflow.experiment)  # a dead server fails before the scoring, not after
    # what serving runs on (this machine's fastest device); auto fills that device
    batch_size = select_runtime("auto").inference_batch_size(params.evaluate.batch_size)
    scores = score_test_split(batch_size)
    calibration = calibrate(scores, batch_size)
    write_per_image_outputs(scores, calibration)
    logged = logs.flatten("evaluate", vars(params.evaluate))
    with tempfile.TemporaryDirectory() as tmp, runs.stage_run("evaluate", params.mlflow.experiment, logged) as mlrun:
        logs.log_metrics({"evaluate_batch_size_used": batch_size})
        log_scores(scores, calibration)
        record, message = register_shipped(params, scores, calibration.temperature, Path(tmp), mlrun.info.run_id)
        lineage.record_run("evaluate", mlrun.info.run_id)
    write_json(paths.stage_metrics("evaluate"), summary(scores, record))
    write_json(paths.DECISION, record)
    ft, head = scores.models["finetuned"].report, scores.models["head_only"].report
    say(f"evaluate: {len(scores.test)} test images — head-only accuracy {head['accuracy']:.4f} "
        f"(macro-F1 {head['macro_f1']:.4f}), fine-tuned accuracy {ft['accuracy']:.4f} "
        f"(macro-F1 {ft['macro_f1']:.4f})\n"
        f"evaluate: ships {scores.shipped} (test accuracy {scores.ship.report['accuracy']:.4f}) — "
        f"chosen on validation: {scores.why}\n"
        f"evaluate: temperature {calibration.temperature:.3f} (fitted on validation): test ECE "
        f"{calibration.ece_before:.4f} → {calibration.ece_after:.4f}, NLL {calibration.nll_before:.4f} → "
        f"{calibration.nll_after:.4f}\n{message}")


def score(classifier: ImageClassifier, pixels: np.ndarray, labels: np.ndarray, batch_size: int):
    probabilities = classifier.probabilities(pixels, batch_size)
    predicted = probabilities.argmax(axis=1)
    return predicted, classification_report(labels, predicted, classifier.classes), probabilities


def calibrate(scores: TestScores, batch_size: int) -> CalibrationSummary:
    """Temperature scaling of the shipped model: T fitted on the validation images (never test),
    then judged on test. The probabilities are what serving computes; log p are valid logits for
    an ensemble's averaged probabilities too."""
    val, val_pixels = holdout.load("val")
    val_probabilities = scores.ship.classifier.probabilities(val_pixels, batch_size)
    temperature = fit_temperature(logits_from_probabilities(val_probabilities), val.label_index.to_numpy())
    return summarize_calibration(logits_from_probabilities(scores.ship.probabilities), scores.labels, temperature)


def score_test_split(batch_size: int) -> TestScores:
    test, pixels = holdout.load()
    labels = test.label_index.to_numpy()
    models = {}
    for name, folder in MODELS.items():
        classifier = ImageClassifier(folder)
        models[name] = Scored(folder, classifier.config, *score(classifier, pixels, labels, batch_size), classifier)
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


def write_per_image_outputs(scores: TestScores, calibration: CalibrationSummary) -> None:
    """Per-class metrics, the confusion plots of both models, calibration and saliency."""
    write_json(paths.METRICS_DIR / "per_class.json",
               {name: scored.report["per_class"] for name, scored in scores.models.items()})
    write_json(paths.CALIBRATION, {**calibration.metrics(), "model": scores.shipped})
    write_json(paths.PLOTS_DIR / "reliability.json",
               [{**row, "curve": curve} for curve, bins in (("uncalibrated", calibration.bins_before),
                                                             ("calibrated", calibration.bins_after))
                for row in bins.rows()])
    figures.save(calibration_diagram(calibration), paths.RELIABILITY_FIGURE)
    figures.save(saliency_figure(scores), paths.SALIENCY_FIGURE)
    for name, scored in scores.models.items():
        classes = scored.config["classes"]
        rows = pd.DataFrame({"actual": scores.test.label, "predicted": [classes[i] for i in scored.predicted]})
        write_text(paths.PLOTS_DIR / f"confusion_{name}.csv", rows.to_csv(index=False))


def saliency_figure(scores: TestScores):
    """Grad-CAM of the shipped model on the first misclassified and correctly classified test images."""
    right = scores.ship.predicted == scores.labels
    half = MAX_SALIENCY_IMAGES // 2
    wrong_first = np.concatenate([np.flatnonzero(~right)[:half], np.flatnonzero(right)])[:MAX_SALIENCY_IMAGES]
    model, config = load_classifier(scores.ship.folder)  # CPU, fp32: gradients of the served weights
    return saliency_grid(model, scores.pixels[wrong_first], scores.labels[wrong_first],
                         scores.ship.predicted[wrong_first], config["classes"], config["input_config"])


def log_scores(scores: TestScores, calibration: CalibrationSummary) -> None:
    ft, head = scores.models["finetuned"].report, scores.models["head_only"].report
    logs.log_metrics({
        "shipped_test_accuracy": scores.ship.report["accuracy"],
        "shipped_test_macro_f1": scores.ship.report["macro_f1"],
        "test_accuracy": ft["accuracy"], "test_macro_f1": ft["macro_f1"],
        "head_only_test_accuracy": head["accuracy"], "head_only_test_macro_f1": head["macro_f1"],
        "finetune_gain": ft["accuracy"] - head["accuracy"],
        **{f"calibration_{k}": v for k, v in calibration.metrics().items()},
    })
    logs.log_dict({"finetuned": ft, "head_only": head}, "evaluation.json")
    logs.log_artifact(str(paths.RELIABILITY_FIGURE))
    logs.log_artifact(str(paths.SALIENCY_FIGURE))
    logs.set_tags({"shipped": scores.shipped})


def registered_checkpoint(folder: Path, temperature: float, out: Path) -> Path:
    """The checkpoint to register: every weight (a head-only one stores just the head and names
    where its backbone's weights come from; serving it would need that download) and the
    temperature in model.json, so the pyfunc and the ONNX file return calibrated probabilities."""
    model, config = load_classifier(folder)
    save_checkpoint(out, model.state_dict(), {**config, "head_only": False, "temperature": temperature})
    return out


def register_shipped(params: Params, scores: TestScores, temperature: float, tmp: Path,
                     run_id: str) -> tuple[dict, str]:
    """Register the shipped model, judged against the champion on these test images."""
    e = params.evaluate
    folder = registered_checkpoint(scores.ship.folder, temperature, tmp / "checkpoint")
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
    predicted, report, _ = score(model, scores.pixels, scores.labels, batch_size)
    return report, predicted == scores.labels
