"""Stage evaluate: score the fine-tuned model and the head-only model *from the test images*,
write DVC metrics and plots, and register the fine-tuned model as a new registry version."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline import gate, paths, registry, tracking
from pipeline.atomic import write_json, write_text
from pipeline.metrics import classification_report
from pipeline.params import Params, params_hash
from pipeline.progress import say
from pipeline.serving import ImageClassifier, input_example, to_png_bytes

STAGES_BEFORE = ("prepare", "extract", "train_head", "finetune")


def test_split() -> tuple[pd.DataFrame, np.ndarray]:
    manifest = pd.read_csv(paths.MANIFEST)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    images = np.load(paths.IMAGES, mmap_mode="r")
    return test, np.asarray(images[test["index"].to_numpy()])


def split_hash(test: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(test.sha256)).encode()).hexdigest()[:16]


def score(classifier: ImageClassifier, pixels: np.ndarray, labels: np.ndarray, batch_size: int):
    predicted = classifier.probabilities(pixels, batch_size).argmax(axis=1)
    return predicted, classification_report(labels, predicted, classifier.classes)


def champion_correctness(name: str, classes: list[str], pixels, labels, batch_size):
    """Score the current champion on *this* test split, so the comparison is paired, per image.

    Returns (champion version or None, per-image correctness or None when not comparable).
    """
    current = registry.champion(name)
    if current is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        champion_model = ImageClassifier(registry.download_checkpoint(current, Path(tmp)))
    if champion_model.classes != classes:
        return current, None  # another label set: no paired comparison is possible
    predicted, _ = score(champion_model, pixels, labels, batch_size)
    return current, predicted == labels


def write_plots(test: pd.DataFrame, classes: list[str], predictions: dict) -> None:
    for model_name, predicted in predictions.items():
        rows = pd.DataFrame({"actual": test.label, "predicted": [classes[i] for i in predicted]})
        write_text(paths.PLOTS_DIR / f"confusion_{model_name}.csv", rows.to_csv(index=False))


def main(params: Params) -> None:
    test, pixels = test_split()
    labels = test.label_index.to_numpy()
    batch = params.evaluate.batch_size
    finetuned = ImageClassifier(paths.FINETUNED_DIR)
    head_only = ImageClassifier(paths.HEAD_DIR)
    classes = finetuned.classes
    ft_pred, ft_report = score(finetuned, pixels, labels, batch)
    head_pred, head_report = score(head_only, pixels, labels, batch)
    weights_sha = hashlib.sha256(
        (paths.FINETUNED_DIR / paths.WEIGHTS_FILE).read_bytes()
    ).hexdigest()
    test_hash = split_hash(test)
    summary = {
        "test_images": len(test),
        "finetuned": {"accuracy": ft_report["accuracy"], "macro_f1": ft_report["macro_f1"]},
        "head_only": {"accuracy": head_report["accuracy"], "macro_f1": head_report["macro_f1"]},
        "finetune_gain": ft_report["accuracy"] - head_report["accuracy"],
    }
    write_json(paths.stage_metrics("evaluate"), summary)
    write_json(paths.METRICS_DIR / "per_class.json",
               {"finetuned": ft_report["per_class"], "head_only": head_report["per_class"]})
    write_plots(test, classes, {"finetuned": ft_pred, "head_only": head_pred})

    name = params.evaluate.model_name
    ft_config = finetuned.config
    logged = tracking.flatten("evaluate", vars(params.evaluate))
    with tracking.stage_run("evaluate", params.mlflow.experiment, logged) as mlrun:
        tracking.log_metrics({
            "test_accuracy": ft_report["accuracy"], "test_macro_f1": ft_report["macro_f1"],
            "head_only_test_accuracy": head_report["accuracy"],
            "head_only_test_macro_f1": head_report["macro_f1"],
            "finetune_gain": summary["finetune_gain"],
        })
        mlflow.log_dict({"finetuned": ft_report, "head_only": head_report}, "evaluation.json")
        decision = register(params, name, ft_config, pixels, labels, ft_pred, weights_sha, test_hash,
                            mlrun.info.run_id)
        tracking.record_run("evaluate", mlrun.info.run_id)
    say(
        f"evaluate: {len(test)} test images — head-only accuracy {head_report['accuracy']:.4f} "
        f"(macro-F1 {head_report['macro_f1']:.4f}), fine-tuned accuracy "
        f"{ft_report['accuracy']:.4f} (macro-F1 {ft_report['macro_f1']:.4f})\n{decision}"
    )


def register(params, name, ft_config, pixels, labels, ft_pred, weights_sha, test_hash, run_id):
    """Register the fine-tuned model, then let the gate decide whether it becomes champion."""
    existing = registry.existing_version(name, weights_sha)
    if existing is not None:
        return f"registry: {name} v{existing.version} already holds these weights; nothing registered"
    accuracy = float((ft_pred == labels).mean())
    data_hash = json.loads(paths.CLASSES.read_text())["data_hash"]
    tags = {
        "git_commit": tracking.git_commit(),
        "data_hash": data_hash,
        "params_hash": params_hash(params),
        "optuna_study": ft_config["study"],
        "optuna_trial": str(ft_config["trial"]),
        "trial_run_id": ft_config.get("trial_run_id", ""),
        "unfrozen_blocks": str(ft_config["k"]),
        "backbone": ft_config["backbone"],
        "weights_sha256": weights_sha,
        "test_split_hash": test_hash,
        "test_accuracy": f"{accuracy:.6f}",
        "evaluate_run_id": run_id,
        **{f"{stage}_run_id": tracking.recorded_run(stage) or "unknown" for stage in STAGES_BEFORE},
    }
    current, champion_correct = champion_correctness(
        name, ft_config["classes"], pixels, labels, params.evaluate.batch_size
    )
    why_no_champion = "first version" if current is None else f"champion v{current.version} has other classes"
    decision = gate.decide(ft_pred == labels, champion_correct, params.evaluate.significance,
                           params.evaluate.min_gain, without_champion=why_no_champion)
    with tempfile.TemporaryDirectory() as tmp:
        example_png = Path(tmp) / "input_example.png"
        example_png.write_bytes(to_png_bytes(pixels[0]))
        version = registry.log_and_register(name, paths.FINETUNED_DIR, input_example(example_png), tags)
    registry.set_alias(name, "challenger", version.version)
    if decision.promote:
        registry.set_alias(name, "champion", version.version)
    client = tracking.client()
    evidence = {**decision.as_tags(), "gate.champion_version": current.version if current else ""}
    for key, value in evidence.items():
        client.set_model_version_tag(name, version.version, key, value)
    mlflow.log_dict(asdict(decision), "promotion_decision.json")
    append_jsonl(paths.PROMOTION_LOG, {
        "time": datetime.now(UTC).isoformat(timespec="seconds"), "model": name,
        "version": version.version, "champion_version": current.version if current else None,
        "test_split_hash": test_hash, **asdict(decision),
    })
    verdict = "champion" if decision.promote else "challenger (champion kept)"
    versus = f" vs champion v{current.version}" if current else ""
    return f"registry: {name} v{version.version} registered as {verdict}{versus} — {decision.reason}"


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and fsync: the promotion log only ever grows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
