"""The MLflow model registry: log the pyfunc, register a version, challenger/champion aliases."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.serving import MODEL_CODE, PIP_REQUIREMENTS

PACKAGE_DIR = Path(__file__).parent


@tracking.timed
def existing_version(name: str, weights_sha256: str):
    """A version already registered with these exact weights (re-running evaluate)."""
    try:
        found = tracking.client().search_model_versions(
            f"name = '{name}' and tags.weights_sha256 = '{weights_sha256}'"
        )
    except MlflowException:
        return None
    return found[0] if found else None


@tracking.timed
def log_and_register(name: str, checkpoint_dir: Path, example, tags: dict):
    """Log the pyfunc under the active run and register it; returns the ModelVersion."""
    from mlflow.models import infer_signature

    signature = infer_signature(example, _example_output())
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint_dir)},
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=PIP_REQUIREMENTS,
        signature=signature,
        input_example=example,
    )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return version


def _example_output():
    import pandas as pd

    return pd.DataFrame({"label": ["a"], "probability": [0.5], "probabilities": [[0.5, 0.5]]})


@tracking.timed
def champion(name: str):
    try:
        return tracking.client().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


@tracking.timed
def set_alias(name: str, alias: str, version: str) -> None:
    tracking.client().set_registered_model_alias(name, alias, version)


@tracking.timed
def download_checkpoint(version, target: Path) -> Path:
    """The checkpoint folder inside a registered version's artifacts (weights + JSON only)."""
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(target)
    )
    found = list(Path(local).rglob("model.json"))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {version.name} v{version.version}")
    return found[0].parent
