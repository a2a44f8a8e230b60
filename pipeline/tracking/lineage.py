"""Lineage, in one place: the run each stage records, the tags a registered version carries
(commit, data, params, study, every stage's run), and `python -m pipeline lineage VERSION`,
which reads them back with how to rebuild the version."""

from __future__ import annotations

import json

from pipeline.atomic import write_json
from pipeline.errors import PipelineError
from pipeline.paths import stage_run_record
from pipeline.tracking import store
from pipeline.tracking.runs import git_commit

ORDER = ("git_commit", "data_hash", "params_hash", "backbone", "unfrozen_blocks", "optuna_study",
         "optuna_trial", "trial_run_id", "prepare_run_id", "extract_run_id", "train_head_run_id",
         "finetune_run_id", "evaluate_run_id", "pipeline_run_id", "test_split_hash", "test_accuracy", "weights_sha256")


def describe(name: str, version: str) -> str:
    from mlflow.exceptions import MlflowException

    store.setup_uri()
    try:
        mv = store.client().get_model_version(name, version)
    except MlflowException as exc:
        raise PipelineError(f"{name} version {version} not found in the registry ({exc.error_code}) — "
                            "list versions in the MLflow UI") from None
    tags = mv.tags
    aliases = ", ".join(mv.aliases) or "none"
    lines = [f"{name} v{mv.version}  (aliases: {aliases})"]
    lines += [f"  {key:<18} {tags[key]}" for key in ORDER if key in tags]
    gate = {k.removeprefix("gate."): v for k, v in tags.items() if k.startswith("gate.")}
    if gate:
        lines.append(f"  promotion          {'promoted' if gate.get('promote') == 'True' else 'not promoted'}"
                     f" — {gate.get('reason', '')}")
    commit = tags.get("git_commit", "unknown")
    lines += [
        "reproduce:",
        f"  git checkout {commit} && dvc pull && dvc repro",
        f"  (the data must hash to {tags.get('data_hash', '?')}; `dvc repro` re-runs the study "
        f"{tags.get('optuna_study', '?')}, which continues from the stored trials)",
    ]
    return "\n".join(lines)


def record_run(stage: str, run_id: str) -> None:
    write_json(stage_run_record(stage), {"run_id": run_id})


def recorded_run(stage: str) -> str | None:
    """The MLflow run id the stage last recorded (for lineage), if any."""
    path = stage_run_record(stage)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")


STAGES_BEFORE_EVALUATE = ("prepare", "extract", "audit", "train_head", "finetune")


def version_tags(config: dict, shipped: str, data_hash: str, params_hash: str, test_split_hash: str,
                 test_accuracy: float, evaluate_run_id: str) -> dict[str, str]:
    """What a registered version records of where it came from (config: its checkpoint's)."""
    return {
        "git_commit": git_commit(),
        "data_hash": data_hash,
        "params_hash": params_hash,
        "shipped": shipped,
        "optuna_study": config.get("study", ""),  # a head-only model has no trial
        "optuna_trial": str(config.get("trial", "")),
        "trial_run_id": config.get("trial_run_id", ""),
        "unfrozen_blocks": str(config["k"]),
        "backbone": config["backbone"],
        "test_split_hash": test_split_hash,
        "test_accuracy": f"{test_accuracy:.6f}",
        "evaluate_run_id": evaluate_run_id,
        **{f"{stage}_run_id": recorded_run(stage) or "unknown" for stage in STAGES_BEFORE_EVALUATE},
    }
