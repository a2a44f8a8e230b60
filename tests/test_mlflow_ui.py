"""Comparing pipeline runs in the MLflow UI, as a user does: one row per pipeline run, and the
compare view putting two runs side by side with the param that made them differ.

Runs a real `mlflow server` on 127.0.0.1 over a store made by two pipeline runs (a `dvc repro`
and a `dvc exp run -S`), and loads its pages in headless Chromium (Debian's package; .ci/run
installs it). Screenshots go to the test's tmp dir.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, WEIGHT_DECAY_SWEEP, free_port, project_env

from pipeline.reporting.markdown import MODEL_TRAINING_VIEW, experiment_page

pytestmark = pytest.mark.slow

CHANGED = WEIGHT_DECAY_SWEEP  # what the experiment sets
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def two_pipeline_runs(weight_decay_experiment) -> Path:
    """A project with one clean pipeline run, plus a `dvc exp run -S` of it (conftest)."""
    return weight_decay_experiment[0]


def pipeline_runs(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("transfer-pipeline")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, experiment, found


def test_one_run_per_pipeline_run_carries_params_metrics_and_its_stages(two_pipeline_runs):
    client, experiment, found = pipeline_runs(two_pipeline_runs)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    pipelines = [r for r in found if r.data.tags.get("stage") == "pipeline"]
    assert len(pipelines) == 2
    first, second = sorted(pipelines, key=lambda r: r.info.start_time)
    assert "mlflow.parentRunId" not in first.data.tags and "mlflow.parentRunId" not in second.data.tags
    assert second.info.run_name == "pipeline wd-sweep" and second.data.tags["dvc_experiment"] == "wd-sweep"
    assert json.loads(second.data.params[CHANGED[0]]) == json.loads(CHANGED[1])
    assert first.data.params[CHANGED[0]] != second.data.params[CHANGED[0]]
    assert {"finetune.max_unfreeze", "data.image_size", "backbone.name", "seed"} <= set(second.data.params)
    for run_ in (first, second):
        metrics = run_.data.metrics
        assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["head_only_test_accuracy"] <= 1
        assert metrics["seconds.finetune"] > 0 and metrics["trials_complete"] >= 1
        assert metrics["audit_label_issues"] >= 0 and metrics["test_ece"] >= 0
        assert metrics["calibration_temperature"] > 0
        assert run_.data.tags["registered_model"].startswith("tiny-classifier v")
        assert client.list_artifacts(run_.info.run_id, "report")  # report.md and its images
    # every stage run hangs under the pipeline run of its repro; trials under their finetune run
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in found}
    stage_of = {r.info.run_id: r.data.tags.get("stage") for r in found}
    for run_id, stage in stage_of.items():
        if stage in ("prepare", "extract", "audit", "train_head", "finetune", "evaluate"):
            assert stage_of[parent_of[run_id]] == "pipeline", (stage, run_id)
        if stage in ("finetune-trial", "finetune-rescore"):
            assert stage_of[parent_of[run_id]] == "finetune"
    second_children = {stage_of[i] for i, p in parent_of.items() if p == second.info.run_id}
    assert second_children == {"finetune", "evaluate"}  # what the experiment re-ran
    assert second.data.tags["prepare_run_id"] == first.data.tags["prepare_run_id"]  # linked, not re-run


def render(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it (headless Chromium)."""
    common = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=25000"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=True).stdout


@pytest.fixture
def mlflow_server(two_pipeline_runs, tmp_path):
    port = free_port()
    store = f"sqlite:///{two_pipeline_runs / 'mlruns' / 'mlflow.db'}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=project_env(two_pipeline_runs),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.mark.skipif(browser() is None, reason="no headless Chromium here (apt-get install chromium; .ci/run does)")
def test_the_mlflow_ui_lists_and_compares_the_pipeline_runs(two_pipeline_runs, mlflow_server, tmp_path):
    _, experiment, found = pipeline_runs(two_pipeline_runs)
    first, second = sorted((r for r in found if r.data.tags.get("stage") == "pipeline"),
                           key=lambda r: r.info.start_time)
    # the link the report (and README) give: the experiment's runs tab, in the model-training view
    runs_page = render(f"{mlflow_server}/{experiment_page(experiment.experiment_id)}", tmp_path / "runs.png")
    assert first.info.run_name in runs_page and second.info.run_name in runs_page  # a row each
    assert "Token Usage" not in runs_page and "Run Name" in runs_page  # the runs table, not GenAI's overview

    ids = json.dumps([first.info.run_id, second.info.run_id])
    compare = render(f"{mlflow_server}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}"
                     f"&{MODEL_TRAINING_VIEW}", tmp_path / "compare.png")
    text = " ".join(re.sub(r"<[^>]+>", " ", compare).split())
    params_table = text[text.index("Parameters Show diff only"):]
    row = params_table[params_table.index(CHANGED[0]) + len(CHANGED[0]):][:120]  # the UI pretty-prints lists
    shown = [float(x) for x in re.findall(r"\d[\d.]*(?:e-?\d+)?", row)[:4]]
    logged = [v for run_ in (first, second) for v in json.loads(run_.data.params[CHANGED[0]])]
    assert sorted(shown) == pytest.approx(sorted(logged)), row
    assert "test_accuracy" in compare
    for run_ in (first, second):  # the compare table shows metrics to 3 decimals
        assert f"{run_.data.metrics['test_accuracy']:.3f}" in compare
    assert (tmp_path / "runs.png").stat().st_size > 10_000 and (tmp_path / "compare.png").stat().st_size > 10_000
