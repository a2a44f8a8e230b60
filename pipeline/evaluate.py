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

import numpy as np
import pandas as pd

from pipeline import gate, holdout, paths, registry, tracking
from pipeline.atomic import write_json, write_text
from pipeline.checkpoints import load_classifier, save_checkpoint
from pipeline.metrics import classification_report
from pipeline.params import Params, params_hash
from pipeline.progress import say
from pipeline.serving import ImageClassifier, input_example, to_png_bytes

STAGES_BEFORE = ("prepare", "extract", "train_head", "finetune")


def score(classifier: ImageClassifier, pixels: np.ndarray, labels: np.ndarray, batch_size: int):
    predicted = classifier.probabilities(pixels, batch_size).argmax(axis=1)
    return predicted, classification_report(labels, predicted, classifier.classes)


def score_champion(name: str, classes: list[str], pixels, labels, batch_size):
    """Score the current champion on *this* test split, so the comparison is paired, per image.

    Returns (champion version or None, its predictions or None when not comparable, its report).
    """
    current = registry.champion(name)
    if current is None:
        return None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        champion_model = ImageClassifier(registry.download_checkpoint(current, Path(tmp)))
    if champion_model.classes != classes:
        return current, None, None  # another label set: no paired comparison is possible
    predicted, report = score(champion_model, pixels, labels, batch_size)
    return current, predicted, report


def write_plots(test: pd.DataFrame, classes: list[str], predictions: dict) -> None:
    for model_name, predicted in predictions.items():
        rows = pd.DataFrame({"actual": test.label, "predicted": [classes[i] for i in predicted]})
        write_text(paths.PLOTS_DIR / f"confusion_{model_name}.csv", rows.to_csv(index=False))


def shipped_model() -> tuple[str, Path, str]:
    """(which model ships, its checkpoint folder, why): decided by finetune on validation only."""
    selection = json.loads(paths.SELECTION.read_text())
    folder = paths.FINETUNED_DIR if selection["shipped"] == "finetuned" else paths.HEAD_DIR
    return selection["shipped"], folder, selection["reason"]


def self_contained(folder: Path, out: Path) -> Path:
    """A checkpoint holding every weight. A head-only one stores just the head and names where
    its backbone's weights come from; registered as is, serving it would need that download."""
    model, config = load_classifier(folder)
    if not config.get("head_only"):
        return folder
    save_checkpoint(out, model.state_dict(), {**config, "head_only": False})
    return out


def main(params: Params) -> None:
    test, pixels = holdout.load()
    labels = test.label_index.to_numpy()
    batch = params.evaluate.batch_size
    finetuned = ImageClassifier(paths.FINETUNED_DIR)
    head_only = ImageClassifier(paths.HEAD_DIR)
    classes = finetuned.classes
    ft_pred, ft_report = score(finetuned, pixels, labels, batch)
    head_pred, head_report = score(head_only, pixels, labels, batch)
    shipped, shipped_dir, why = shipped_model()
    ship_pred, ship_report, ship_config = ((ft_pred, ft_report, finetuned.config) if shipped == "finetuned"
                                           else (head_pred, head_report, head_only.config))
    test_hash = holdout.split_hash(test)
    summary = {
        "test_images": len(test),
        "finetuned": {"accuracy": ft_report["accuracy"], "macro_f1": ft_report["macro_f1"]},
        "head_only": {"accuracy": head_report["accuracy"], "macro_f1": head_report["macro_f1"]},
        "finetune_gain": ft_report["accuracy"] - head_report["accuracy"],
        # the model registered for deployment, chosen on validation data before this test
        "shipped": {"model": shipped, "accuracy": ship_report["accuracy"], "macro_f1": ship_report["macro_f1"]},
    }
    write_json(paths.METRICS_DIR / "per_class.json",
               {"finetuned": ft_report["per_class"], "head_only": head_report["per_class"]})
    write_plots(test, classes, {"finetuned": ft_pred, "head_only": head_pred})

    name = params.evaluate.model_name
    logged = tracking.flatten("evaluate", vars(params.evaluate))
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.stage_run("evaluate", params.mlflow.experiment, logged) as mlrun:
        shipped_dir = self_contained(shipped_dir, Path(tmp) / "checkpoint")
        weights_sha = hashlib.sha256((shipped_dir / paths.WEIGHTS_FILE).read_bytes()).hexdigest()
        tracking.log_metrics({
            "shipped_test_accuracy": ship_report["accuracy"], "shipped_test_macro_f1": ship_report["macro_f1"],
            "test_accuracy": ft_report["accuracy"], "test_macro_f1": ft_report["macro_f1"],
            "head_only_test_accuracy": head_report["accuracy"],
            "head_only_test_macro_f1": head_report["macro_f1"],
            "finetune_gain": summary["finetune_gain"],
        })
        tracking.log_dict({"finetuned": ft_report, "head_only": head_report}, "evaluation.json")
        tracking.set_tags({"shipped": shipped})
        record, message = register(params, name, shipped_dir, ship_config, pixels, labels, ship_pred,
                                   weights_sha, test_hash, mlrun.info.run_id)
        tracking.record_run("evaluate", mlrun.info.run_id)
    if record["champion_version"] is not None and record["champion_accuracy"] is not None:
        # the champion this version was judged against, on the same test images
        summary["champion"] = {"version": record["champion_version"],
                               "accuracy": record["champion_accuracy"],
                               "macro_f1": record["champion_macro_f1"]}
    write_json(paths.stage_metrics("evaluate"), summary)
    write_json(paths.DECISION, record)
    say(
        f"evaluate: {len(test)} test images — head-only accuracy {head_report['accuracy']:.4f} "
        f"(macro-F1 {head_report['macro_f1']:.4f}), fine-tuned accuracy "
        f"{ft_report['accuracy']:.4f} (macro-F1 {ft_report['macro_f1']:.4f})\n"
        f"evaluate: ships {shipped} (test accuracy {ship_report['accuracy']:.4f}) — chosen on validation: {why}\n"
        f"{message}"
    )


def register(params, name, model_dir, ft_config, pixels, labels, ft_pred, weights_sha, test_hash, run_id):
    """Register the shipped model (model_dir) with the gate's decision, then move the aliases.

    Idempotent and resumable: the decision is stored as tags of the version when it is created,
    so a re-run (or a run after a kill between registering and aliasing) finds the version by its
    weights and only finishes what is missing. Returns (decision record, one-line message).
    """
    version = registry.existing_version(name, weights_sha)
    registered_now = version is None
    if registered_now:
        tags = lineage_tags(ft_config, weights_sha, test_hash, ft_pred, labels, run_id, params)
        current, champion_pred, champion_report = score_champion(
            name, ft_config["classes"], pixels, labels, params.evaluate.batch_size
        )
        why_no_champion = "first version" if current is None else f"champion v{current.version} has other classes"
        decision = gate.decide(ft_pred == labels, None if champion_pred is None else champion_pred == labels,
                               params.evaluate.significance, params.evaluate.min_gain,
                               without_champion=why_no_champion)
        tags |= decision.as_tags()
        tags["gate.champion_version"] = current.version if current else ""
        tags["gate.champion_macro_f1"] = str(champion_report["macro_f1"]) if champion_report else ""
        with tempfile.TemporaryDirectory() as tmp:
            example_png = Path(tmp) / "input_example.png"
            example_png.write_bytes(to_png_bytes(pixels[0]))
            version = registry.log_and_register(name, model_dir, input_example(example_png), tags)
        tracking.log_dict(asdict(decision), "promotion_decision.json")
    record = decision_record(version, test_hash)
    finish_registration(name, version, record)
    verdict = "champion" if record["promote"] else "challenger (champion kept)"
    versus = f" vs champion v{record['champion_version']}" if record["champion_version"] else ""
    if registered_now:
        return record, f"registry: {name} v{version.version} registered as {verdict}{versus} — {record['reason']}"
    return record, (f"registry: {name} v{version.version} already holds these weights (registered as {verdict}"
                    f"{versus}); nothing registered")


def lineage_tags(ft_config, weights_sha, test_hash, ft_pred, labels, run_id, params) -> dict[str, str]:
    return {
        "git_commit": tracking.git_commit(),
        "data_hash": holdout.data_hash(),
        "params_hash": params_hash(params),
        "shipped": "finetuned" if ft_config.get("study") else "head_only",
        "optuna_study": ft_config.get("study", ""),  # a head-only model has no trial
        "optuna_trial": str(ft_config.get("trial", "")),
        "trial_run_id": ft_config.get("trial_run_id", ""),
        "unfrozen_blocks": str(ft_config["k"]),
        "backbone": ft_config["backbone"],
        "weights_sha256": weights_sha,
        "test_split_hash": test_hash,
        "test_accuracy": f"{float((ft_pred == labels).mean()):.6f}",
        "evaluate_run_id": run_id,
        **{f"{stage}_run_id": tracking.recorded_run(stage) or "unknown" for stage in STAGES_BEFORE},
    }


def decision_record(version, test_hash: str) -> dict:
    """The gate's decision as recorded on the version: the same on a first run and on any re-run."""
    tags = version.tags
    champion_macro_f1 = tags.get("gate.champion_macro_f1", "")
    if "gate.promote" in tags:
        decision = gate.Decision.from_tags(tags)
    else:  # a version registered by an older release, before decisions were stored as tags
        decision = gate.Decision(False, "no gate decision recorded on this version", 0,
                                 float(tags.get("test_accuracy", "nan")), None, 0, 0, None, float("nan"),
                                 float("nan"))
    return {
        "model": version.name,
        "version": int(version.version),
        "champion_version": int(tags["gate.champion_version"]) if tags.get("gate.champion_version") else None,
        "champion_macro_f1": float(champion_macro_f1) if champion_macro_f1 else None,
        "test_split_hash": tags.get("test_split_hash", test_hash),
        **asdict(decision),
    }


@tracking.timed
def finish_registration(name: str, version, record: dict) -> None:
    """Aliases and the promotion-log line, each done once; the final tag marks the version complete.

    Only a registration cut short is finished: the newest version without the marker. The champion
    alias moves only if the champion it was judged against is still the champion.
    """
    if version.tags.get("registration_complete") == "true" or "gate.promote" not in version.tags:
        return  # complete, or registered before decisions were stored as tags: leave it alone
    newest = max(int(v.version) for v in tracking.client().search_model_versions(f"name = '{name}'"))
    if int(version.version) != newest:
        return
    registry.set_alias(name, "challenger", version.version)
    current = registry.champion(name)
    judged_against = record["champion_version"]
    if record["promote"] and (int(current.version) if current else None) == judged_against:
        registry.set_alias(name, "champion", version.version)
    logged = paths.PROMOTION_LOG.exists() and any(
        (entry.get("model"), str(entry.get("version"))) == (name, str(record["version"]))
        for entry in map(json.loads, paths.PROMOTION_LOG.read_text().splitlines())
    )
    if not logged:
        append_jsonl(paths.PROMOTION_LOG, {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record})
    tracking.client().set_model_version_tag(name, version.version, "registration_complete", "true")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and fsync: the promotion log only ever grows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
