"""reports/report.md, section by section, from the outputs of the other stages.

What a reviewer needs to accept a retrain: the head-only model, the fine-tuned model and the
champion on the same test images, the promotion decision with its evidence, per-class figures,
confusion matrices, training curves, the Optuna study, the misclassified images, and the run ids.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.data import holdout
from pipeline.params import Params
from pipeline.reporting import figures
from pipeline.search import storage
from pipeline.tracking import lineage, runs, store

CURVE_KEYS = ("train_loss", "val_loss", "val_accuracy")


SHIPPED_NAMES = {"finetuned": "fine-tuned", "head_only": "head-only"}


def read_json(path):
    return json.loads(path.read_text())


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def confusion(csv_path, classes: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    rows = pd.read_csv(csv_path)
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for actual, predicted in zip(rows.actual, rows.predicted, strict=True):
        matrix[index[actual], index[predicted]] += 1
    return matrix, rows


def trial_curve(run_id: str) -> list[dict]:
    """The best trial's per-epoch curve from its MLflow run ([] when this store lacks the run,
    e.g. finetune's outputs were pulled from a DVC remote and its runs live elsewhere)."""
    from mlflow.exceptions import MlflowException

    client = store.client()
    by_epoch: dict[int, dict] = {}
    try:
        for key in CURVE_KEYS:
            for point in client.get_metric_history(run_id, key):
                by_epoch.setdefault(point.step, {"epoch": point.step})[key] = point.value
    except MlflowException:
        return []
    return [by_epoch[e] for e in sorted(by_epoch) if "val_accuracy" in by_epoch[e]]


def study_images(study_name: str) -> list[str]:
    import optuna

    from pipeline.search.plots import study_figures

    try:
        s = optuna.load_study(study_name=study_name, storage=storage.make_storage())
    except KeyError:  # this machine's storage lacks the study (set OPTUNA_STORAGE to the team's)
        return []
    saved = []
    for name, figure in study_figures(s, parallel_coordinate=False).items():
        figures.save(figure, paths.REPORT_DIR / name)
        saved.append(name)
    return saved


def run_link(run_id: str | None, experiment_id: str | None) -> str:
    if not run_id:
        return "—"
    uri = store.tracking_uri()
    if uri.startswith("http") and experiment_id:
        return f"[`{run_id}`]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # MLflow 3.17's switch away from its GenAI view


def experiment_page(experiment_id: str | None) -> str:
    """The experiment's runs table in the MLflow UI (the part of the URL after the server). The
    runs tab, because MLflow 3.11.1 ignores the view switch and opens an experiment on its GenAI
    overview (releases between it and 3.17 were not looked at)."""
    return f"#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def compare_hint(experiment_id: str | None) -> str:
    """Where a reader compares the pipeline runs: MLflow's model-training view of the experiment."""
    uri = store.tracking_uri()
    page = experiment_page(experiment_id)
    if uri.startswith("http"):
        return f"Compare the pipeline runs at {uri.rstrip('/')}/{page}."
    return (f"Compare the pipeline runs: `mlflow ui --backend-store-uri {store_name(uri)}`, then open "
            f"`http://127.0.0.1:5000/{page}` (one row per pipeline run; tick two and press Compare).")


def store_name(uri: str) -> str:
    """The tracking store as a reader can use it: a local store relative to the project, never
    this machine's absolute path (a server URL as is)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri.removeprefix(prefix))
        with contextlib.suppress(ValueError):
            return prefix + path.relative_to(paths.home_root()).as_posix()
    return uri


def shipping_section(selection: dict) -> list[str]:
    """Which model was registered for deployment and why, decided on validation data only."""
    lines = ["## Which model ships (decided on the validation split)", "",
             f"**The {SHIPPED_NAMES[selection['shipped']]} model ships**: {selection['reason']}. "
             f"{selection['n']} validation images; only the fine-tuned model right on "
             f"{selection['only_finetuned_right']}, only the head-only model on "
             f"{selection['only_head_only_right']}. The fine-tuned model is the ensemble of every run of the "
             "configurations whose mean validation accuracy over fresh seeds is within one standard "
             "error of the best:", ""]
    ensembled = set(selection["ensembled_trials"])
    rows = [[c["trial"], c["k"], ", ".join(fmt(v) for v in c["val_accuracies"]), fmt(c["mean_val_accuracy"]),
             "yes" if c["trial"] in ensembled else "no"] for c in selection["candidates"]]
    return lines + table(["trial", "k", "val accuracy per seed", "mean", "in the ensemble"], rows) + [""]


def audit_section(manifest: pd.DataFrame, images: np.ndarray, out: Path) -> list[str]:
    """What the audit stage found, and what `exclude` left out of training."""
    counts = read_json(paths.stage_metrics("audit"))
    excluded = read_json(paths.EXCLUDED)
    issues, pairs = pd.read_csv(paths.LABEL_ISSUES), pd.read_csv(paths.NEAR_DUPLICATES)
    lines = ["## Data audit", "",
             f"{counts['label_issues']} of {counts['images_audited']} train/val images are suspected label errors "
             f"(cleanlab confident learning on out-of-fold probabilities, accuracy "
             f"{fmt(counts['out_of_fold_accuracy'], 3)}); {counts['cross_split_pairs']} near-duplicate pair(s) "
             f"straddle splits ({counts['train_test_pairs']} train/test, {counts['train_val_pairs']} train/val, "
             f"{counts['val_test_pairs']} val/test) of {counts['near_duplicate_pairs']} found. Lists: "
             f"`{paths.LABEL_ISSUES}`, `{paths.NEAR_DUPLICATES}`.", ""]
    if excluded["action"] == "exclude":
        names = ", ".join(f"`{e['path']}`" for e in excluded["images"][:20])
        more = f" and {len(excluded['images']) - 20} more" if len(excluded["images"]) > 20 else ""
        lines += [f"**audit.action: exclude** — {len(excluded['images'])} training image(s) left out of train_head "
                  f"and finetune (val and test untouched; `{paths.EXCLUDED}` says why): {names or 'none'}{more}.", ""]
    else:
        lines += [f"audit.action: report — nothing was left out; `exclude` would leave out "
                  f"{counts['would_exclude_train_images']} training image(s).", ""]
    pixels_of = dict(zip(manifest.path, manifest["index"], strict=True))
    top = issues.head(figures.MAX_MISCLASSIFIED)
    figures.save(figures.image_grid(
        images[[pixels_of[p] for p in top.path]],
        [f"{r.given} → {r.suggested} ({r.label_quality:.2f})\n{r.path.rsplit('/', 1)[-1][:24]}"
         for r in top.itertuples()],
        "no suspected label errors"), out / "label_issues.png")
    lines += ["Top suspects (given → suggested, label quality):", "", "![suspected label errors](label_issues.png)", ""]
    cross = pairs[pairs.cross_split].head(figures.MAX_MISCLASSIFIED // 2)
    if len(cross):
        ends = [e for r in cross.itertuples() for e in ((r.path_a, r.split_a), (r.path_b, r.split_b))]
        figures.save(figures.image_grid(
            images[[pixels_of[p] for p, _ in ends]], [f"{split}: {p.rsplit('/', 1)[-1][:20]}" for p, split in ends],
            "", columns=6), out / "near_duplicates.png")
        lines += ["Near-duplicates across splits (side by side):", "",
                  "![cross-split near-duplicates](near_duplicates.png)", ""]
    return lines


def calibration_section(out: Path) -> list[str]:
    c = read_json(paths.CALIBRATION)
    shutil.copy(paths.RELIABILITY_FIGURE, out / paths.RELIABILITY_FIGURE.name)
    return ["## Calibration (shipped model, test images)", "",
            f"Temperature scaling fitted on the validation images: T = {c['temperature']:.3f}. The registered "
            "model (pyfunc and ONNX) returns the calibrated probabilities; accuracy is unchanged.", ""] + table(
        ["", "uncalibrated", "calibrated"],
        [["expected calibration error (15 bins)", fmt(c["ece_before"]), fmt(c["ece_after"])],
         ["negative log-likelihood", fmt(c["nll_before"]), fmt(c["nll_after"])]]) + [""] + ([
        "**Temperature scaling raised the test NLL**: the validation images it was fitted on disagree with "
        "the test images about the model's confidence (few validation images, or a shift between splits).", ""]
        if c["nll_after"] > c["nll_before"] else []) + [f"![reliability diagram]({paths.RELIABILITY_FIGURE.name})", ""]


def build(params: Params, pipeline_run_id: str) -> str:
    """Write the images and return the markdown."""
    evaluation = read_json(paths.stage_metrics("evaluate"))
    per_class = read_json(paths.METRICS_DIR / "per_class.json")
    decision = read_json(paths.DECISION)
    finetune = read_json(paths.stage_metrics("finetune"))
    selection = read_json(paths.SELECTION)
    config = read_json(paths.FINETUNED_DIR / paths.CONFIG_FILE)
    classes = config["classes"]
    test, pixels = holdout.load()
    model = f"{decision['model']} v{decision['version']}"
    out = paths.REPORT_DIR

    lines = [f"# Retrain report — {model}", ""]
    lines += [f"Commit `{runs.git_commit()[:12]}`, data `{holdout.data_hash()[:16]}`, "
              f"test split `{decision['test_split_hash']}` ({evaluation['test_images']} images), "
              f"backbone `{config['backbone']}`.", ""]

    lines += ["## Test results (same test images for every model)", ""]
    champion = evaluation.get("champion")
    ships_head = selection["shipped"] == "head_only"
    rows = [
        ["head-only (frozen backbone, linear head)" + (f" — **{model}**" if ships_head else ""),
         fmt(evaluation["head_only"]["accuracy"]), fmt(evaluation["head_only"]["macro_f1"])],
        [f"fine-tuned, top {config['k']} block(s) unfrozen, ensemble of {len(config.get('members', [1]))}"
         + ("" if ships_head else f" — **{model}**"),
         fmt(evaluation["finetuned"]["accuracy"]), fmt(evaluation["finetuned"]["macro_f1"])],
        [f"champion v{champion['version']} (before this run)", fmt(champion["accuracy"]),
         fmt(champion["macro_f1"])] if champion else ["champion (before this run)", "none", "—"],
    ]
    lines += table(["model", "accuracy", "macro-F1"], rows) + [""]

    lines += shipping_section(selection)

    verdict = "**promoted to champion**" if decision["promote"] else "**kept as challenger** (champion unchanged)"
    lines += ["## Promotion decision", "", f"{model} {verdict}: {decision['reason']}.", ""]
    lines += table(["evidence", "value"], [
        ["test images (n)", decision["n"]],
        ["challenger accuracy", fmt(decision["challenger_accuracy"])],
        ["champion accuracy", fmt(decision["champion_accuracy"])],
        ["only the challenger right (b)", decision["only_challenger_right"]],
        ["only the champion right (c)", decision["only_champion_right"]],
        ["exact one-sided McNemar p", fmt(decision["p_value"], 6)],
        ["significance / minimum gain", f"{decision['significance']} / {decision['min_gain']}"],
    ]) + [""]

    lines += ["## Per class", ""]
    ft, head = per_class["finetuned"], per_class["head_only"]
    lines += table(["class", "test images", "fine-tuned precision", "fine-tuned recall", "fine-tuned F1",
                    "head-only F1"],
                   [[c, ft[c]["support"], fmt(ft[c]["precision"], 3), fmt(ft[c]["recall"], 3),
                     fmt(ft[c]["f1"], 3), fmt(head[c]["f1"], 3)] for c in classes]) + [""]

    matrices = {}
    matrices["fine-tuned"], predictions = confusion(paths.PLOTS_DIR / "confusion_finetuned.csv", classes)
    matrices["head-only"], _ = confusion(paths.PLOTS_DIR / "confusion_head_only.csv", classes)
    figures.save(figures.confusion_matrices(matrices, classes), out / "confusion.png")
    lines += ["## Confusion matrices", "", "![confusion matrices](confusion.png)", ""]

    curves = {"head (feature extraction)": read_json(paths.PLOTS_DIR / "train_head_curve.json")}
    best_curve = trial_curve(config["trial_run_id"]) if config.get("trial_run_id") else []
    if best_curve:
        curves[f"best trial {config['trial']} (k={config['k']})"] = best_curve
    figures.save(figures.training_curves(curves), out / "curves.png")
    lines += ["## Training curves", "", "![training curves](curves.png)", ""]

    lines += ["## Optuna study", "", f"Study `{config['study']}`: best trial {finetune['best_trial']} "
              f"(val accuracy {fmt(finetune['best_val_accuracy'])}), {finetune['trials_complete']} complete, "
              f"{finetune['trials_pruned']} pruned.", ""]
    lines += table(["hyperparameter", "best value"],
                   [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in config["hyperparameters"].items()])
    images = study_images(config["study"])
    lines += [""] + ([f"![{name}]({name})" for name in images] if images else
                     ["_The study is not in this machine's Optuna storage: no history or importance images._"]) + [""]

    wrong = np.flatnonzero(predictions.actual.to_numpy() != predictions.predicted.to_numpy())
    figures.save(figures.misclassified_grid(
        pixels[wrong], list(predictions.actual.iloc[wrong]), list(predictions.predicted.iloc[wrong]),
        [test.path.iloc[i].rsplit("/", 1)[-1] for i in wrong],
    ), out / "misclassified.png")
    shown = min(len(wrong), figures.MAX_MISCLASSIFIED)
    lines += ["## Misclassified test images (true → predicted)", "",
              f"{len(wrong)} of {len(test)} test images are misclassified by the fine-tuned model"
              f"{f'; the first {shown} are shown' if len(wrong) > shown else ''}.", "",
              "![misclassified test images](misclassified.png)", ""]
    shutil.copy(paths.SALIENCY_FIGURE, out / paths.SALIENCY_FIGURE.name)
    lines += ["## Where the shipped model looks (Grad-CAM)", "",
              "Misclassified test images first, then correctly classified ones (given → predicted, probability); "
              "warm colours drove the predicted class.", "", f"![Grad-CAM]({paths.SALIENCY_FIGURE.name})", ""]
    lines += calibration_section(out)
    manifest = pd.read_csv(paths.MANIFEST)
    lines += audit_section(manifest, np.load(paths.IMAGES, mmap_mode="r"), out)

    experiment = store.client().get_experiment_by_name(params.mlflow.experiment)
    experiment_id = experiment.experiment_id if experiment else None
    stages = ("prepare", "extract", "audit", "train_head", "finetune", "evaluate")
    lines += ["## MLflow", "", f"Registered model `models:/{decision['model']}/{decision['version']}`; "
              f"tracking store `{store_name(store.tracking_uri())}`. {compare_hint(experiment_id)}", ""]
    lines += table(["run", "MLflow run id"],
                   [["pipeline (compare these)", run_link(pipeline_run_id, experiment_id)]]
                   + [[f"stage {s}", run_link(lineage.recorded_run(s), experiment_id)] for s in stages]
                   + [[f"best trial {config['trial']}", run_link(config.get("trial_run_id"), experiment_id)]])
    return "\n".join(lines) + "\n"
