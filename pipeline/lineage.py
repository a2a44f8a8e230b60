"""`python -m pipeline lineage VERSION`: where a registered version came from, and how to rebuild it."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.errors import PipelineError

ORDER = ("git_commit", "data_hash", "params_hash", "backbone", "unfrozen_blocks", "optuna_study",
         "optuna_trial", "trial_run_id", "prepare_run_id", "extract_run_id", "train_head_run_id",
         "finetune_run_id", "evaluate_run_id", "test_split_hash", "test_accuracy", "weights_sha256")


def describe(name: str, version: str) -> str:
    tracking.setup_uri()
    try:
        mv = tracking.client().get_model_version(name, version)
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
