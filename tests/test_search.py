"""Optuna x MLflow: kill-and-resume, parallel workers, PostgreSQL, queued DVC experiments."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import BIN, make_project, optuna_trial_ids, project_env, run

from pipeline.search import trials

DVC = str(BIN / "dvc")


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory) -> Path:
    """A project with prepare → train_head done once; tests copy it."""
    project = make_project(tmp_path_factory.mktemp("base") / "project")
    run([DVC, "repro", "train_head"], project)
    return project


def copy_project(base: Path, target: Path, finetune: dict) -> Path:
    shutil.copytree(base, target, symlinks=True, ignore=shutil.ignore_patterns("mlruns"))
    params = yaml.safe_load((target / "params.yaml").read_text())
    params["finetune"].update(finetune)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return target


def study_states(project: Path, storage: str | None = None) -> Counter:
    storage = storage or f"sqlite:///{project / 'mlruns' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial number was duplicated"
    return Counter(t.state.name for t in trials)


def mlflow_statuses(project: Path) -> Counter:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("transfer-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return Counter(r.info.status for r in runs)


@pytest.mark.fault
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(trained_head, tmp_path):
    """SIGKILL finetune 5 times — at random moments of the process, and inside trials it had just
    started — and the next run ends with exactly N finished (complete or pruned) trials, none
    RUNNING in Optuna, none RUNNING in MLflow."""
    n = 4
    project = copy_project(trained_head, tmp_path / "p", {"n_trials": n, "epochs": 3})
    rng = random.Random(1234)
    command = [sys.executable, "-m", "pipeline", "finetune"]
    landed = []
    for kill in range(5):
        started = optuna_trial_ids(project)
        process = subprocess.Popen(command, cwd=project, env=project_env(project),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill % 2 == 0:  # inside a trial this process started (tiny trials: a fraction of a second)
            while process.poll() is None and not optuna_trial_ids(project, "RUNNING") - started:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1))
        else:  # anywhere: imports, loading, a trial, MLflow logging
            time.sleep(rng.uniform(4.0, 14.0))
        landed.append(process.poll() is None)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert sum(landed) >= 3, f"only {sum(landed)} of 5 kills landed while finetune ran"
    run(command, project)
    states = study_states(project)
    assert states["COMPLETE"] + states["PRUNED"] == n
    assert states["RUNNING"] == 0
    assert states["FAIL"] >= 1, "no kill landed inside a trial: the retry of a killed trial went untested"
    assert mlflow_statuses(project)["RUNNING"] == 0


@pytest.mark.fault
@pytest.mark.slow
def test_four_workers_start_together_on_a_new_store(trained_head, tmp_path):
    n = 6
    project = copy_project(trained_head, tmp_path / "p", {"n_trials": n})
    command = [sys.executable, "-m", "pipeline", "worker"]
    env = {**project_env(project), "OMP_NUM_THREADS": "1", "PIPELINE_TORCH_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], "\n".join(outputs)[-4000:]
    states = study_states(project)
    assert states["COMPLETE"] + states["PRUNED"] == n and states["RUNNING"] == 0
    assert mlflow_statuses(project)["RUNNING"] == 0


@pytest.mark.slow
def test_finetune_with_workers_runs_its_helpers_on_the_same_study(trained_head, tmp_path):
    """`python -m pipeline finetune --workers 2` (params say 1): the helper it spawns joins the
    study under finetune's run and exits cleanly; the study ends with exactly n trials."""
    n = 4
    project = copy_project(trained_head, tmp_path / "p", {"n_trials": n, "workers": 1})
    out = run([sys.executable, "-m", "pipeline", "finetune", "--workers", "2"], project).stdout
    assert len(re.findall(r"^worker: ran \d+ trial\(s\)", out, re.MULTILINE)) == 1, out[-3000:]
    states = study_states(project)
    assert states["COMPLETE"] + states["PRUNED"] == n and states["RUNNING"] == 0
    assert mlflow_statuses(project)["RUNNING"] == 0


def postgres_url() -> str | None:
    return os.environ.get("PIPELINE_TEST_POSTGRES")


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.skipif(postgres_url() is None,
                    reason="no PostgreSQL server: set PIPELINE_TEST_POSTGRES (.ci/run starts one)")
def test_two_workers_share_a_postgres_study(trained_head, tmp_path):
    from sqlalchemy import create_engine, text

    url = postgres_url()
    database = f"study_{os.getpid()}_{random.randrange(10**6)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {database}"))
    storage = url.rsplit("/", 1)[0] + f"/{database}"
    n = 4
    project = copy_project(trained_head, tmp_path / "p", {"n_trials": n})
    env = {**project_env(project), "OPTUNA_STORAGE": storage, "PIPELINE_TORCH_THREADS": "1"}
    command = [sys.executable, "-m", "pipeline", "worker"]
    workers = [subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)[-4000:]
    states = study_states(project, storage)
    assert states["COMPLETE"] + states["PRUNED"] == n and states["RUNNING"] == 0


@pytest.mark.slow
def test_pruned_and_failed_trials_in_mlflow(trained_head, tmp_path, monkeypatch):
    """A pruned trial ends KILLED with pruned_at_epoch; a failed one FAILED with the error."""
    import mlflow

    from pipeline.params import load_params
    from pipeline.tracking import store

    project = copy_project(trained_head, tmp_path / "p", {"n_trials": 1, "epochs": 2})
    monkeypatch.chdir(project)
    params = load_params(project / "params.yaml")
    store.setup("transfer-pipeline")
    with mlflow.start_run(run_name="finetune") as parent:
        runner = trials.TrialRunner(params, parent.info.run_id)
        always_prune = optuna.pruners.ThresholdPruner(lower=2.0)  # accuracy < 2: always pruned
        s = optuna.create_study(pruner=always_prune, direction="maximize")
        with pytest.raises(optuna.TrialPruned):
            runner.run_trial(s.ask())
        broken = s.ask()
        # the runner keeps each k's inputs resident, so break its inputs, not features.source
        monkeypatch.setattr(runner, "sources", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            runner.run_trial(broken)
    client = store.client()
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {r.data.tags["optuna_trial"]: r for r in children}
    pruned, failed = by_trial["0"], by_trial["1"]
    assert pruned.info.status == "KILLED" and pruned.data.tags["pruned_at_epoch"] == "1"
    assert len(client.get_metric_history(pruned.info.run_id, "val_accuracy")) == 1
    assert failed.info.status == "FAILED" and "ZeroDivisionError" in failed.data.tags["error"]


@pytest.mark.slow
def test_queued_dvc_experiments_land_in_the_project_store(trained_head, tmp_path):
    project = copy_project(trained_head, tmp_path / "p", {})
    run([DVC, "repro", "finetune"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    before = sum(mlflow_statuses(project).values())
    assert len(_stage_runs(project, "finetune")) == 1
    # up to finetune only: the store is what is under test, evaluate and report add nothing here
    run([DVC, "exp", "run", "finetune", "--queue", "-S", "finetune.n_trials=3"], project)
    run([DVC, "exp", "run", "finetune", "--queue", "-S", "finetune.epochs=3"], project)
    # Two workers share DVC's file-system broker, where concurrent writes can garble a message
    # (dvc-task#73, dvc#10428): a worker whose monitor thread then dies never exits. So the
    # workers get no pipe of ours to hold open (run() would wait for it), `queue status` may
    # fail once, and whatever worker is left is stopped at the end.
    subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=project, env=project_env(project), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    try:
        deadline, status = time.time() + 600, ""
        while time.time() < deadline:
            asked = run([DVC, "queue", "status"], project, check=False)
            status = asked.stdout if asked.returncode == 0 else status
            if asked.returncode == 0 and "Queued" not in status and "Running" not in status:
                break
            time.sleep(5)
    finally:
        run([DVC, "queue", "stop", "--kill"], project, check=False)
    assert status.count("Success") == 2, status
    # both experiments ran finetune in their temp copies; the runs are in the project's store
    assert len(_stage_runs(project, "finetune")) == 3  # baseline + 2 queued
    assert sum(mlflow_statuses(project).values()) > before
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "a temp copy kept its own store"
    shown = run([DVC, "exp", "show", "--no-pager", "--md"], project).stdout
    assert "finetune.n_trials" in shown and "best_val_accuracy" in shown


def _stage_runs(project: Path, stage: str) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("transfer-pipeline")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'")


@pytest.mark.slow
def test_live_fallback_feeds_the_same_inputs_and_trains(trained_head, tmp_path, monkeypatch):
    """finetune.cache=false runs the frozen prefix live: same inputs as the cache (no
    augmentation on val), and a study completes on it."""
    import numpy as np

    from pipeline.devices import select_runtime
    from pipeline.model import features
    from pipeline.model.backbones import build_backbone
    from pipeline.model.bn_folding import folded_copy

    project = copy_project(trained_head, tmp_path / "p", {"cache": False, "n_trials": 1, "epochs": 1})
    monkeypatch.chdir(project)
    meta = features.read_meta()
    # the frozen prefix as finetune runs it live: folded, like extract's
    backbone = folded_copy(build_backbone(meta["backbone"], meta["backbone_weights"]))
    runtime = select_runtime("auto")
    idx = np.random.default_rng(0).permutation(len(features.labels("val")))  # rows come back in this order
    for k in (0, 1, 2):
        cached = features.source("val", k).batch(idx, None)
        live = features.LiveSource("val", k, backbone, runtime, augment=False, seed=0).batch(idx, None)
        assert live.shape == cached.shape
        assert (live - cached).abs().max() <= 2e-2 * cached.abs().max()
    run([sys.executable, "-m", "pipeline", "finetune"], project)
    assert study_states(project)["COMPLETE"] == 1


@pytest.mark.fault
@pytest.mark.slow
def test_sigterm_ends_runs_killed_not_running(trained_head, tmp_path):
    """SIGTERM (what CI runners and `kill` send) mid-study: the stage run and the trial's run end
    KILLED, the Optuna trial FAIL with a retry queued; nothing is left RUNNING."""
    # trials of 200 epochs (seconds each, not a fraction of one): the signal lands inside the
    # first trial's training, never between two trials, where no trial is there to fail
    project = copy_project(trained_head, tmp_path / "p", {"n_trials": 2, "epochs": 200})
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "finetune"], cwd=project,
                               env=project_env(project), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not optuna_trial_ids(project, "RUNNING"):
        time.sleep(0.5)
    assert optuna_trial_ids(project, "RUNNING"), "no trial started within 120 s"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) != 0
    finally:  # a stage deaf to SIGTERM would otherwise train on for minutes beside the next tests
        if process.poll() is None:
            process.kill()
    statuses = mlflow_statuses(project)
    assert statuses["RUNNING"] == 0, statuses
    (stage,) = _stage_runs(project, "finetune")
    (trial,) = _stage_runs(project, "finetune-trial")
    assert (stage.info.status, trial.info.status) == ("KILLED", "KILLED")
    assert "optuna_state" not in trial.data.tags  # stopped, not pruned (a pruned trial's run is KILLED too)
    states = study_states(project)
    assert (states["RUNNING"], states["FAIL"], states["WAITING"], states["COMPLETE"]) == (0, 1, 1, 0), states


@pytest.mark.slow
def test_a_finetuned_model_worse_on_validation_is_not_registered_for_deployment(trained_head, tmp_path,
                                                                                monkeypatch):
    """Learning rates that wreck the pretrained blocks: the fine-tuned candidate loses to the
    head-only model on validation, so finetune ships the head-only model and evaluate registers
    it — chosen before the test split is looked at."""
    from mlflow import MlflowClient

    from pipeline.serving.classifier import ImageClassifier
    from pipeline.tracking import store
    from pipeline.tracking.registry import download_checkpoint

    project = copy_project(trained_head, tmp_path / "project", {
        "head_lr": [3.0, 3.0], "backbone_lr_ratio": [1.0, 1.0], "rescore_top": 1,
    })
    run([DVC, "repro", "evaluate"], project)
    selection = json.loads((project / "metrics/selection.json").read_text())
    assert selection["finetuned_val_accuracy"] < selection["head_only_val_accuracy"]
    assert selection["shipped"] == "head_only"
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    assert evaluate["shipped"] == {"model": "head_only", **evaluate["head_only"]}

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'tiny-classifier'")
    assert version.tags["shipped"] == "head_only" and version.tags["optuna_trial"] == ""
    # the registered weights are the head-only model's, self-contained (no backbone download)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store.setup_uri()  # mlflow's global URIs: an earlier test in this process may have set them
    local = download_checkpoint(version, tmp_path / "registered")
    config = json.loads((local / "model.json").read_text())
    assert config["head_only"] is False
    pixels = np.load(project / "data/prepared/images.npy")[:8]
    registered = ImageClassifier(local).probabilities(pixels)
    head_only = ImageClassifier(project / "models/head").probabilities(pixels)
    finetuned = ImageClassifier(project / "models/finetuned").probabilities(pixels)
    # the same model, calibrated: the registered copy divides the head-only logits by its temperature
    calibrated = torch.softmax(torch.log(torch.from_numpy(head_only)) / config["temperature"], dim=1).numpy()
    np.testing.assert_allclose(registered, calibrated, atol=1e-4)
    assert not np.allclose(registered, finetuned, atol=1e-3)
