"""Shared fixtures: a tiny but real project (git + DVC + params) in a temp folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Shrunken params: 3 classes, tiny images, 2 trials — the real stages, seconds not minutes.
TINY = {
    "data": {"image_size": 64, "min_images_per_class": 6},
    "shapes": {"classes": ["circle", "square", "triangle"], "images_per_class": 24,
               "image_size": 64},
    "extract": {"batch_size": 32, "views": 2, "cache_blocks": 2},
    "train_head": {"epochs": 6, "patience": 3},
    # ~14 validation images cannot make a McNemar test significant: ship the fine-tuned model
    # whenever it is right on more of them (p < 0.6 <=> b > c), so the tests exercise it
    "finetune": {"n_trials": 2, "epochs": 2, "max_unfreeze": 2, "batch_size": 16, "workers": 1,
                 "pruner_warmup_epochs": 1, "ship_significance": 0.6},
    "evaluate": {"model_name": "tiny-classifier"},
}


def tiny_params(overrides: dict | None = None) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY, **(overrides or {})}.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def project_env(project: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PIPELINE_QUIET"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("OPTUNA_STORAGE", None)
    env.pop("PIPELINE_HOME", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 600, check: bool = True, env: dict | None = None):
    """env: variables to set on top of project_env (e.g. a shared MLFLOW_TRACKING_URI)."""
    result = subprocess.run(cmd, cwd=cwd, env={**project_env(cwd), **(env or {})}, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-5000:]}"
        )
    return result


def make_project(path: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repository holding this project's pipeline definition."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", path / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    (path / ".gitignore").write_text("/mlruns/\n__pycache__/\n")
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "test@example.com"], path)
    run(["git", "config", "user.name", "test"], path)
    run([str(BIN / "dvc"), "init", "-q"], path)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "init"], path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def fingerprint(project: Path) -> dict:
    """What a rerun must reproduce exactly: every DVC metric and plot, the gate's decision, and the
    bytes of the prepared data, the cached features and both models' weights."""
    found = {}
    for path in sorted((project / "metrics").glob("*.json")) + sorted((project / "plots").iterdir()):
        found[str(path.relative_to(project))] = path.read_text()
    binaries = [project / "data/prepared/images.npy", project / "models/head/model.safetensors",
                project / "models/finetuned/model.safetensors", *sorted((project / "data/features").glob("*.npy"))]
    for path in binaries:
        found[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    config = json.loads((project / "models/finetuned/model.json").read_text())
    config.pop("trial_run_id")  # an MLflow run id: new on every run by design
    found["models/finetuned/model.json"] = config
    return found


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """One clean `dvc repro` of the tiny project: (project, its output, its fingerprint).

    Shared: the end-to-end test goes on from it, the fault tests compare their runs with it.
    """
    project = make_project(tmp_path_factory.mktemp("reference") / "project")
    result = run([str(BIN / "dvc"), "repro"], project)
    return project, result.stdout, fingerprint(project)


@pytest.fixture(scope="session")
def second_clean_run(tmp_path_factory) -> tuple[Path, dict]:
    """Another clean `dvc repro` of the same tiny project, in another folder with its own stores:
    (project, its fingerprint). The registry tests go on from it; the determinism test compares
    its fingerprint with reference_run's."""
    project = make_project(tmp_path_factory.mktemp("second") / "project")
    run([str(BIN / "dvc"), "repro"], project)
    return project, fingerprint(project)


# `make test` runs the suite in parallel (pytest-xdist, --dist loadgroup). Tests sharing an
# expensive fixture (a whole `dvc repro`) go to one worker, so each is built once.
SHARED_FIXTURE_GROUPS = {"reference_run": "clean_runs", "second_clean_run": "clean_runs",
                         "trained_head": "trained_head"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):  # `-p no:xdist`: nothing to schedule
        return
    for item in items:
        groups = {SHARED_FIXTURE_GROUPS[name] for name in item.fixturenames if name in SHARED_FIXTURE_GROUPS}
        if groups:
            (group,) = groups  # a test needing two groups' fixtures would build one of them twice
            item.add_marker(pytest.mark.xdist_group(group))
