"""Retrain from CI: the workflow lints, and `python -m pipeline retrain` does in a temp git repo with a
local DVC remote what the workflow does on GitHub — pull, reproduce what changed, push, register,
apply the gate, write the report."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, make_project, run

DVC = str(BIN / "dvc")
WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
ALL_STAGES = ["shapes", "prepare", "extract", "audit", "train_head", "finetune", "evaluate", "report"]


def actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "actionlint"), str(path)], capture_output=True, text=True, timeout=120)


def test_workflow_passes_actionlint(tmp_path):
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"  # the linter really checks: a typo in an expression fails
    broken.write_text(WORKFLOW.read_text().replace("github.run_id", "github.run_idd"))
    assert actionlint(broken).returncode != 0

    spec = yaml.safe_load(WORKFLOW.read_text())
    triggers = spec[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers["push"]["paths"]) == {"data/**.dvc", "params.yaml", "dvc.yaml", "pipeline/**"}
    assert {"schedule", "workflow_dispatch", "repository_dispatch"} <= set(triggers)
    assert spec["concurrency"]["group"] and spec["concurrency"]["cancel-in-progress"] is False
    steps = spec["jobs"]["retrain"]["steps"]
    assert any("python -m pipeline retrain" in step.get("run", "") for step in steps)
    assert any(step.get("with", {}).get("cache") == "pip" for step in steps)
    assert "RETRAIN_RUNNER" in spec["jobs"]["retrain"]["runs-on"]  # the GPU label switch
    assert "secrets.MLFLOW_TRACKING_URI" in spec["jobs"]["retrain"]["env"]["MLFLOW_TRACKING_URI"]


def add_images(images: Path, params_file: Path, seed: int, only: str | None = None, prefix: str = "") -> int:
    """Real PNGs from the shapes generator (another seed gives other pictures)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.data.shapes import generate
    from pipeline.params import load_params

    staging = images.parent / f".staging-{seed}"
    generate(load_params(params_file).shapes, seed, staging)
    added = 0
    for folder in sorted(staging.iterdir()):
        if only and folder.name != only:
            continue
        (images / folder.name).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, images / folder.name / f"{prefix}{png.name}")
            added += 1
    shutil.rmtree(staging)
    return added


def retrain(project: Path, env: dict) -> list[str]:
    out = run([sys.executable, "-m", "pipeline", "retrain", "--summary", str(project / "summary.md")],
              project, env=env).stdout
    line = next(line for line in out.splitlines() if line.startswith("retrain: re-ran "))
    ran = line.removeprefix("retrain: re-ran ").split(";")[0]
    return [] if ran == "nothing (up to date)" else ran.split(", ")


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)


def registry(env: dict):
    from mlflow import MlflowClient

    uri = env["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def correct_on_test_split(client, version: str, target: Path):
    """Per-image correctness of a registered version on the test split of the project in the
    working directory, scored here, apart from evaluate: the gate's evidence, recomputed."""
    from pipeline.data import holdout
    from pipeline.serving.classifier import ImageClassifier
    from pipeline.tracking.registry import download_checkpoint

    test, pixels = holdout.load()
    local = download_checkpoint(client.get_model_version("tiny-classifier", version), target)
    predicted = ImageClassifier(local).probabilities(pixels).argmax(axis=1)
    return predicted == test.label_index.to_numpy()


def check_report(project: Path) -> str:
    report = (project / "reports" / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"confusion.png", "curves.png", "optuna_history.png", "misclassified.png"} <= set(images)
    for image in images:
        assert (project / "reports" / image).stat().st_size > 1000, image
    for heading in ("## Test results", "## Promotion decision", "## Per class", "## MLflow"):
        assert heading in report
    return report


@pytest.mark.slow
@pytest.mark.long
def test_retrain_pulls_reproduces_what_changed_pushes_and_registers(tmp_path, monkeypatch):
    team = tmp_path / "team"  # stands in for the team's MLflow server and study database
    team.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{team / 'mlflow.db'}",
           "OPTUNA_STORAGE": f"sqlite:///{team / 'optuna.db'}"}
    remote = tmp_path / "dvc-remote"
    project = make_project(tmp_path / "project", {
        "data": {"image_size": 64, "min_images_per_class": 6, "source": "data/images"},
    })
    add_images(project / "data" / "images", project / "params.yaml", seed=1)
    run([DVC, "add", "-q", "data/images"], project)
    run([DVC, "remote", "add", "-d", "team", str(remote)], project)
    commit(project, "data and remote")

    # 1. first retrain: everything runs, v1 becomes champion, the cache goes to the remote
    assert retrain(project, env) == ALL_STAGES
    client = registry(env)
    assert str(client.get_model_version_by_alias("tiny-classifier", "champion").version) == "1"
    assert any(remote.rglob("*")), "dvc push sent nothing to the remote"
    report = check_report(project)
    assert "tiny-classifier v1" in report and "**promoted to champion**: first version" in report
    summary = (project / "summary.md").read_text()
    assert "Stages re-run: shapes, prepare" in summary and "## Promotion decision" in summary
    assert "![" not in summary  # images live in the artifact, not the job summary
    evaluate_run = json.loads((project / "metrics/runs/evaluate.json").read_text())["run_id"]
    # the report is logged to the pipeline run, the run its stage runs are nested under
    pipeline_run = client.get_run(evaluate_run).data.tags["mlflow.parentRunId"]
    assert client.get_run(pipeline_run).data.tags["stage"] == "pipeline"
    logged = {a.path for a in client.list_artifacts(pipeline_run, "report")}
    assert "report/report.md" in logged and "report/confusion.png" in logged
    commit(project, "retrain 1 results")

    # 2. new images in one class, pushed by a user; CI retrains in a fresh clone
    assert add_images(project / "data" / "images", project / "params.yaml", seed=2, only="circle",
                      prefix="new_") == 24
    run([DVC, "add", "-q", "data/images"], project)
    run([DVC, "push", "-q"], project)
    commit(project, "more circles")
    ci = tmp_path / "ci-checkout"
    run(["git", "clone", "-q", str(project), str(ci)], tmp_path)
    assert retrain(ci, env) == ALL_STAGES[1:]  # shapes' output came from the remote
    decision = json.loads((ci / "metrics/decision.json").read_text())
    assert decision["version"] == 2 and decision["champion_version"] == 1
    v2 = client.get_model_version("tiny-classifier", "2")
    assert v2.tags["gate.promote"] == str(decision["promote"]) and v2.tags["gate.champion_version"] == "1"
    # the gate's evidence, recomputed apart from evaluate: both versions scored here on this test split
    from pipeline.tracking import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    store.setup_uri()  # download_checkpoint resolves models:/ through mlflow's global registry URI
    monkeypatch.chdir(ci)  # holdout reads the prepared data where a stage would: the working directory
    right = {v: correct_on_test_split(client, v, tmp_path / f"v{v}") for v in ("1", "2")}
    b, c = int((right["2"] & ~right["1"]).sum()), int((~right["2"] & right["1"]).sum())
    assert (decision["n"], decision["only_challenger_right"], decision["only_champion_right"]) == (
        len(right["2"]), b, c)
    assert decision["challenger_accuracy"] == pytest.approx(right["2"].mean())
    assert decision["champion_accuracy"] == pytest.approx(right["1"].mean())
    p = sum(math.comb(b + c, i) for i in range(b, b + c + 1)) / 2 ** (b + c)  # one-sided exact McNemar
    assert decision["p_value"] == pytest.approx(p)
    gain = right["2"].mean() - right["1"].mean()
    assert decision["promote"] == (p < decision["significance"] and gain >= decision["min_gain"])
    champion = str(client.get_model_version_by_alias("tiny-classifier", "champion").version)
    assert champion == ("2" if decision["promote"] else "1")
    assert "champion v1 (before this run)" in check_report(ci)
    assert "`dvc metrics diff`" in (ci / "summary.md").read_text()  # old vs new, in the job summary
    commit(ci, "retrain 2 results")

    # DVC's own views of the change, against the previous commit
    diff = json.loads(run([DVC, "metrics", "diff", "HEAD~2", "--json"], ci).stdout)
    assert diff, "dvc metrics diff shows no change after retraining on new data"
    run([DVC, "params", "diff", "HEAD~2"], ci)
    plots = run([DVC, "plots", "show", "-o", str(tmp_path / "plots-html")], ci)
    html = (tmp_path / "plots-html" / "index.html").read_text()
    assert "head training curve" in html and "confusion fine-tuned" in html, plots.stdout
    assert '"val_accuracy"' in html and '"predicted"' in html  # the data is embedded, not just titles

    # 3. nothing changed: a fresh checkout pulls everything and re-runs nothing
    again = tmp_path / "ci-checkout-2"
    run(["git", "clone", "-q", str(ci), str(again)], tmp_path)
    assert retrain(again, env) == []
    assert len(client.search_model_versions("name = 'tiny-classifier'")) == 2
