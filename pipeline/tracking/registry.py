"""The MLflow model registry: log the pyfunc, register a version judged by the promotion gate,
move the challenger/champion aliases, and append the promotion log.

It knows nothing of stages or serving: evaluate passes it the pyfunc to log and a `judge` that
scores the current champion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.tracking import gate, logs, store
from pipeline.tracking.resend import create_once

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole pipeline package ships as code


@dataclass(frozen=True)
class Pyfunc:
    """What MLflow logs as the model: a "model from code" file, its pinned requirements, an example."""

    code: Path
    pip_requirements: list[str]
    input_example: Any


# judge(current champion or None) -> (gate decision, version tags): evaluate's scoring of the
# champion on this run's test images, called only when a new version is registered
Judge = Callable[[Any], tuple[gate.Decision, dict[str, str]]]


@store.timed
def existing_version(name: str, weights_sha256: str):
    """A version already registered with these exact weights (re-running evaluate)."""
    from mlflow.exceptions import MlflowException

    try:
        return version_with_weights(name, weights_sha256)
    except MlflowException:
        return None


def version_with_weights(name: str, weights_sha256: str):
    found = store.client().search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha256}'")
    return found[0] if found else None


@store.timed
def log_and_register(name: str, checkpoint_dir: Path, pyfunc: Pyfunc, tags: dict):
    """Log the pyfunc under the active run and register it; returns the ModelVersion."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    example_output = pd.DataFrame({"label": ["a"], "probability": [0.5], "probabilities": [[0.5, 0.5]]})
    # A logged model made twice by a resend is an unregistered leftover, so this one is simply
    # resent; the version, which users see, is looked for by its weights first (resend.py).
    info = create_once(lambda: mlflow.pyfunc.log_model(
        name="model",
        python_model=str(pyfunc.code),
        artifacts={"checkpoint": str(checkpoint_dir)},
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=pyfunc.pip_requirements,
        signature=infer_signature(pyfunc.input_example, example_output),
        input_example=pyfunc.input_example,
    ))
    # a version found made by a failed try is whole: the tracking server itself names a new version
    # in its logged model's mlflow.modelVersions tag, the link register_model would add
    return create_once(lambda: mlflow.register_model(info.model_uri, name, tags=tags),
                       lambda: version_with_weights(name, tags["weights_sha256"]))


@store.timed
def champion(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return store.client().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


@store.timed
def set_alias(name: str, alias: str, version: str) -> None:
    store.client().set_registered_model_alias(name, alias, version)


@store.timed
def download_checkpoint(version, target: Path) -> Path:
    """The checkpoint folder inside a registered version's artifacts (weights + JSON only)."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(target)
    )
    found = list(Path(local).rglob("model.json"))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {version.name} v{version.version}")
    return found[0].parent


@store.timed
def attach_to_version(name: str, version: int | str, folder: Path, artifact_path: str, tags: dict[str, str]) -> None:
    """Log a folder as artifacts of the run that registered the version (on a re-run too, when that
    run is an earlier one) and tag the version: what was derived from it (the ONNX export) travels
    with it."""
    client = store.client()
    run_id = client.get_model_version(name, str(version)).run_id
    client.log_artifacts(run_id, str(folder), artifact_path)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def register(name: str, checkpoint_dir: Path, weights_sha256: str, pyfunc: Pyfunc, judge: Judge,
             promotion_log: Path) -> tuple[dict, str]:
    """Register the checkpoint with the gate's decision, then move the aliases.

    Idempotent and resumable: the decision is stored as tags of the version when it is created,
    so a re-run (or a run after a kill between registering and aliasing) finds the version by its
    weights and only finishes what is missing. Returns (decision record, one-line message).
    """
    version = existing_version(name, weights_sha256)
    registered_now = version is None
    if registered_now:
        current = champion(name)
        decision, tags = judge(current)
        tags = {**tags, **decision.as_tags(), "weights_sha256": weights_sha256,
                "gate.champion_version": current.version if current else ""}
        version = log_and_register(name, checkpoint_dir, pyfunc, tags)
        logs.log_dict(asdict(decision), "promotion_decision.json")
    record = decision_record(version)
    finish_registration(name, version, record, promotion_log)
    verdict = "champion" if record["promote"] else "challenger (champion kept)"
    versus = f" vs champion v{record['champion_version']}" if record["champion_version"] else ""
    if registered_now:
        return record, f"registry: {name} v{version.version} registered as {verdict}{versus} — {record['reason']}"
    return record, (f"registry: {name} v{version.version} already holds these weights (registered as {verdict}"
                    f"{versus}); nothing registered")


def decision_record(version) -> dict:
    """The gate's decision as recorded on the version: the same on a first run and on any re-run."""
    tags = version.tags
    champion_macro_f1 = tags.get("gate.champion_macro_f1", "")
    return {
        "model": version.name,
        "version": int(version.version),
        "champion_version": int(tags["gate.champion_version"]) if tags.get("gate.champion_version") else None,
        "champion_macro_f1": float(champion_macro_f1) if champion_macro_f1 else None,
        "test_split_hash": tags["test_split_hash"],
        **asdict(gate.Decision.from_tags(tags)),
    }


@store.timed
def finish_registration(name: str, version, record: dict, promotion_log: Path) -> None:
    """Aliases and the promotion-log line, each done once; the final tag marks the version complete.

    Only a registration cut short is finished: the newest version without the marker. The champion
    alias moves only if the champion it was judged against is still the champion.
    """
    if version.tags.get("registration_complete") == "true":
        return
    newest = max(int(v.version) for v in store.client().search_model_versions(f"name = '{name}'"))
    if int(version.version) != newest:
        return
    set_alias(name, "challenger", version.version)
    current = champion(name)
    if record["promote"] and (int(current.version) if current else None) == record["champion_version"]:
        set_alias(name, "champion", version.version)
    # Keyed on the version's MLflow run id, not its number: the log is committed with the code
    # while the store is not, so a fresh clone's new store numbers its versions from 1 again.
    logged = version.run_id is not None and promotion_log.exists() and any(
        entry.get("run_id") == version.run_id for entry in map(json.loads, promotion_log.read_text().splitlines())
    )
    if not logged:
        append_jsonl(promotion_log, {"time": datetime.now(UTC).isoformat(timespec="seconds"),
                                     "run_id": version.run_id, **record})
    store.client().set_model_version_tag(name, version.version, "registration_complete", "true")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and fsync: the promotion log only ever grows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
