"""Every data/, models/, metrics/ and mlruns/ path. dvc.yaml mirrors these; nothing else hard-codes one.

Paths of stage outputs are relative to the working directory, because DVC runs each stage in the
workspace it is reproducing (a queued `dvc exp run` uses a temporary copy). State that must
outlive such copies — the MLflow store and the Optuna study — is resolved against the *home*
project root instead, see `home_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")

SHAPES_DIR = Path("data/shapes")

PREPARED_DIR = Path("data/prepared")
MANIFEST = PREPARED_DIR / "manifest.csv"
IMAGES = PREPARED_DIR / "images.npy"  # (N, S, S, 3) uint8, decoded once at the working size
CLASSES = PREPARED_DIR / "classes.json"
PREPARE_REPORT = PREPARED_DIR / "report.json"

FEATURES_DIR = Path("data/features")
FEATURES_META = FEATURES_DIR / "meta.json"

AUDIT_DIR = Path("data/audit")
LABEL_ISSUES = AUDIT_DIR / "label_issues.csv"  # suspected mislabelled train/val images, worst first
NEAR_DUPLICATES = AUDIT_DIR / "near_duplicates.csv"  # pairs of near-identical images, cross-split first
EXCLUDED = AUDIT_DIR / "excluded.json"  # training images train_head/finetune leave out (audit.action)

HEAD_DIR = Path("models/head")
FINETUNED_DIR = Path("models/finetuned")

METRICS_DIR = Path("metrics")
REPORT_DIR = Path("reports")
REPORT = REPORT_DIR / "report.md"
PLOTS_DIR = Path("plots")

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
SELECTION = METRICS_DIR / "selection.json"  # finetune: the chosen configuration and which model ships
DECISION = METRICS_DIR / "decision.json"  # the gate's decision for the evaluated model, with evidence
PROMOTION_LOG = METRICS_DIR / "promotions.jsonl"  # append-only: every gate decision and its evidence
CALIBRATION = METRICS_DIR / "calibration.json"  # evaluate: the shipped model's temperature, ECE/NLL before/after
RELIABILITY_FIGURE = PLOTS_DIR / "reliability.png"  # evaluate's figures; the report shows them
SALIENCY_FIGURE = PLOTS_DIR / "saliency.png"
RUNS_DIR = METRICS_DIR / "runs"  # MLflow run id per stage; kept out of outputs that are deps


def pooled_features(split: str) -> Path:
    """(N, V, D) float32 pooled backbone features; V = views (1 for val/test)."""
    return FEATURES_DIR / f"{split}_pooled.npy"


def cut_activations(split: str, k: int) -> Path:
    """(N, V, C, H, W) float16 activations entering the k-th block from the top."""
    return FEATURES_DIR / f"{split}_cut{k}.npy"


def stage_metrics(stage: str) -> Path:
    return METRICS_DIR / f"{stage}.json"


def stage_run_record(stage: str) -> Path:
    """Where a stage notes its MLflow run id, for evaluate's lineage tags.

    Not inside the stage's data outputs: a fresh run id there would change their hash and make
    DVC re-run every downstream stage even when the data came out identical.
    """
    return RUNS_DIR / f"{stage}.json"


def home_root(start: Path | None = None) -> Path:
    """The project root whose mlruns/ holds the shared state.

    `dvc exp run --queue/--temp` runs stages in a copy under `<root>/.dvc/tmp/exps/...`;
    a relative store there would silently write into the throw-away copy.
    """
    override = os.environ.get("PIPELINE_HOME")
    if override:
        return Path(override).resolve()
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".dvc").is_dir():
            return candidate
    return here


def mlruns_dir() -> Path:
    return home_root() / "mlruns"
