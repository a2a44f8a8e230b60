"""One MLflow run per pipeline run: the row a user compares in the MLflow UI.

It carries every param of params.yaml (flattened: `finetune.max_unfreeze`), the headline
metrics, the registered version, commit, data hash and DVC experiment name; the stage runs of
this `dvc repro` (and, beneath finetune, its trials) become its children, so the runs table
shows one row per pipeline run and the compare view shows what differs. Stages a repro did not
re-run stay under the pipeline run that ran them; this one links them by tag.

Three levels (pipeline → stage → trial): MLflow's runs table nests by the `mlflow.parentRunId`
tag and lists only the top level as rows, each with an expander — one row per pipeline run
(seen in headless Chromium, tests/test_mlflow_ui.py). MLflow 3.17's UI picks its view from a
global "GenAI | Model training" switch (URL `?workflowType=machine_learning`), not from the
experiment's `mlflow.experimentKind` tag, which store.setup still sets for the UIs that read it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import asdict

from pipeline.tracking import logs, store

STAGES = ("prepare", "extract", "audit", "train_head", "finetune", "evaluate")
PARENT_TAG = "mlflow.parentRunId"


def flat_params(params) -> dict:
    """Every param of params.yaml, flattened with dots (`finetune.head_lr`); ranges read as in
    params.yaml (`[1e-05, 0.001]`)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in logs.flatten("", asdict(params)).items()}


def headline_metrics(evaluation: dict, finetune: dict, train_head: dict, decision: dict) -> dict[str, float]:
    """What a reviewer compares first, from the stages' DVC metrics."""
    return {
        "test_accuracy": evaluation["shipped"]["accuracy"],  # the model that ships
        "test_macro_f1": evaluation["shipped"]["macro_f1"],
        "finetuned_test_accuracy": evaluation["finetuned"]["accuracy"],
        "finetuned_test_macro_f1": evaluation["finetuned"]["macro_f1"],
        "head_only_test_accuracy": evaluation["head_only"]["accuracy"],
        "head_only_test_macro_f1": evaluation["head_only"]["macro_f1"],
        "head_val_accuracy": train_head["val_accuracy"],
        "best_trial_val_accuracy": finetune["best_val_accuracy"],
        "chosen_k": finetune["chosen_k"],
        "ensemble_size": finetune["ensemble_size"],
        "trials_complete": finetune["trials_complete"],
        "trials_pruned": finetune["trials_pruned"],
        "ships_finetuned": finetune["ships_finetuned"],
        "registered_version": decision["version"],
        "promoted": int(decision["promote"]),
    }


def data_and_calibration_metrics(audit: dict, calibration: dict) -> dict[str, float]:
    """The audit's counts and the shipped model's calibration, comparable across pipeline runs."""
    return {
        "audit_label_issues": audit["label_issues"],
        "audit_cross_split_pairs": audit["cross_split_pairs"],
        "audit_excluded_train_images": audit["excluded_train_images"],
        "calibration_temperature": calibration["temperature"],
        "test_ece_uncalibrated": calibration["ece_before"],
        "test_ece": calibration["ece_after"],
    }


def run_name(git_commit: str) -> str:
    """`pipeline <dvc experiment>` under `dvc exp run`, else `pipeline <short commit>`."""
    return f"pipeline {os.environ.get('DVC_EXP_NAME') or git_commit[:8]}"


def context_tags(decision: dict, data_hash: str, stage_run_ids: dict[str, str | None]) -> dict[str, str]:
    tags = {
        "registered_model": f"{decision['model']} v{decision['version']}",
        "data_hash": data_hash,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    return tags | {f"{stage}_run_id": run_id or "" for stage, run_id in stage_run_ids.items()}


@store.timed
def stage_seconds(run_ids: dict[str, str | None]) -> dict[str, float]:
    """Wall seconds of each stage's recorded run (`seconds.finetune`); a run this store lacks
    (outputs pulled from a DVC remote, runs in another store) is left out."""
    from mlflow.exceptions import MlflowException

    out = {}
    for stage, run_id in run_ids.items():
        try:
            info = store.client().get_run(run_id).info if run_id else None
        except MlflowException:
            continue
        if info and info.end_time:
            out[f"seconds.{stage}"] = (info.end_time - info.start_time) / 1000
    return out


@store.timed
def adopt_stage_runs(experiment_id: str, parent_run_id: str) -> int:
    """Make this repro's top-level stage runs (finished, failed or killed attempts alike)
    children of the pipeline run; returns how many.

    This repro's: not yet adopted, not running, from this host and this DVC experiment — so
    queued experiments running side by side (`dvc exp run -j 2`) each adopt only their own.
    """
    client = store.client()
    mine = (f"attributes.status != 'RUNNING' and tags.host = '{socket.gethostname()}' "
            f"and tags.dvc_experiment = '{os.environ.get('DVC_EXP_NAME', '')}'")
    found = client.search_runs([experiment_id], filter_string=mine, max_results=5000)
    orphans = [r for r in found if r.data.tags.get("stage") in (*STAGES, "finetune-worker")
               and PARENT_TAG not in r.data.tags and r.info.run_id != parent_run_id]
    for run in orphans:
        client.set_tag(run.info.run_id, PARENT_TAG, parent_run_id)
    return len(orphans)


@store.timed
def link_version(decision: dict, run_id: str) -> None:
    """The registered version names the pipeline run that made it (lineage, and the UI's link):
    the first one — a later run that registered nothing new leaves it. Nothing when this store's
    registry lacks the version (evaluate ran against another store)."""
    from mlflow.exceptions import MlflowException

    name, version = decision["model"], str(decision["version"])
    with contextlib.suppress(MlflowException):
        if "pipeline_run_id" not in store.client().get_model_version(name, version).tags:
            store.client().set_model_version_tag(name, version, "pipeline_run_id", run_id)
