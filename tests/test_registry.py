"""The registry as the contract: servable image model, lineage, promotion gate, no pickles."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BIN, clean_copy, free_port, project_env, run
from PIL import Image

from pipeline import paths
from pipeline.serving.export import SHIPPED_DIRS
from pipeline.tracking.gate import decide, mcnemar_exact_p

DVC = str(BIN / "dvc")
MODEL = "tiny-classifier"


# --- the gate, on constructed predictions -------------------------------------------------------

def correctness(n_right: int, n: int = 200, offset: int = 0) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[offset : offset + n_right] = True
    return out


def test_gate_promotes_a_clearly_better_challenger():
    champion = correctness(140)  # 70%
    challenger = correctness(170)  # 85%, right on everything the champion gets right
    d = decide(challenger, champion, significance=0.05, min_gain=0.01)
    assert d.promote and d.only_challenger_right == 30 and d.only_champion_right == 0
    assert d.p_value < 1e-8 and d.n == 200
    assert d.champion_accuracy == 0.70 and d.challenger_accuracy == 0.85


@pytest.mark.parametrize(
    ("challenger", "why"),
    [
        (correctness(140), "not significant"),  # equal
        (correctness(142, offset=1), "not significant"),  # barely better (3 vs 1 discordant)
        (correctness(120), "not significant"),  # worse
    ],
)
def test_gate_keeps_the_champion_otherwise(challenger, why):
    d = decide(challenger, correctness(140), significance=0.05, min_gain=0.0)
    assert not d.promote and why in d.reason
    tags = d.as_tags()
    for key in ("gate.p_value", "gate.champion_accuracy", "gate.challenger_accuracy", "gate.n"):
        assert tags[key] != ""


def test_gate_minimum_gain_applies_even_when_significant():
    d = decide(correctness(150), correctness(140), significance=0.05, min_gain=0.1)
    assert d.p_value < 0.05 and not d.promote and "below the minimum" in d.reason


def test_mcnemar_p_values_from_scipy_equal_the_exact_binomial_tail():
    """scipy's binomtest replaced our own sum of binomial terms: the same p-value for every
    discordant split up to 60 pairs (to float rounding)."""
    from math import comb

    for n in range(1, 61):
        for b in range(n + 1):
            exact = sum(comb(n, i) for i in range(b, n + 1)) / 2**n
            assert mcnemar_exact_p(b, n - b) == pytest.approx(exact, rel=1e-12, abs=1e-300), (b, n - b)


def test_first_version_is_promoted_and_mcnemar_matches_the_binomial_tail():
    assert decide(correctness(10), None, 0.05, 0.0).promote
    assert mcnemar_exact_p(3, 1) == pytest.approx(5 / 16)
    assert mcnemar_exact_p(0, 0) == 1.0


# --- a real registered model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(reference_run, tmp_path_factory) -> Path:
    """A project after one clean pipeline run: version 1 of the model registered as champion."""
    return clean_copy(reference_run, tmp_path_factory.mktemp("registered") / "project")


def tracking_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"


def shipped_checkpoint(project: Path) -> Path:
    """The folder of the model finetune chose to ship, the one registered: the fine-tuned one only
    where it beat head-only on validation (on some machines' numerics the tiny run ships head-only)."""
    return project / SHIPPED_DIRS[json.loads((project / paths.SELECTION).read_text())["shipped"]]


def a_test_image(registered) -> tuple[Path, str]:
    manifest = pd.read_csv(registered / "data/prepared/manifest.csv")
    row = manifest[manifest.split == "test"].iloc[0]
    return registered / "data/shapes" / row.path, row.label


@pytest.mark.slow
def test_predicts_the_same_from_bytes_base64_and_arrays(registered, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(registered))
    mlflow.set_tracking_uri(tracking_uri(registered))
    mlflow.set_registry_uri(tracking_uri(registered))
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    path, _ = a_test_image(registered)
    png = path.read_bytes()
    from_bytes = model.predict(pd.DataFrame({"image": [png, png]}))
    from_b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(png).decode()] * 2}))
    pixels = np.asarray(Image.open(path).convert("RGB"))
    from_array = model.unwrap_python_model().predict(None, np.stack([pixels, pixels]))
    for frame in (from_b64, from_array):
        assert list(frame.label) == list(from_bytes.label)
        np.testing.assert_allclose(np.stack(frame.probabilities), np.stack(from_bytes.probabilities),
                                   atol=1e-4)
    assert model.metadata.signature is not None


@pytest.mark.slow
def test_the_registered_model_returns_probabilities_calibrated_on_validation(registered, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipeline.serving.classifier import ImageClassifier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(registered))
    mlflow.set_tracking_uri(tracking_uri(registered))
    mlflow.set_registry_uri(tracking_uri(registered))
    calibration = json.loads((registered / "metrics/calibration.json").read_text())
    report = (registered / "reports/report.md").read_text()
    # T is fitted on val and judged on test: where that made test NLL worse, the report says so
    assert (calibration["nll_after"] > calibration["nll_before"]) == ("raised the test NLL" in report)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    served = model.unwrap_python_model().classifier
    assert served.temperature == pytest.approx(calibration["temperature"]) and served.temperature != 1.0
    raw = ImageClassifier(shipped_checkpoint(registered))
    assert raw.temperature == 1.0  # the stage outputs stay as trained; the registered copy carries T
    path, _ = a_test_image(registered)
    pixels = raw.pixels_from(pd.DataFrame({"image": [path.read_bytes()]}))
    expected = torch.softmax(torch.log(torch.from_numpy(raw.probabilities(pixels))) / served.temperature, dim=1)
    np.testing.assert_allclose(served.probabilities(pixels), expected.numpy(), atol=1e-3)
    version = MlflowClient(tracking_uri(registered)).get_model_version_by_alias(MODEL, "champion")
    assert float(version.tags["onnx.top1_agreement"]) >= 0.999
    onnx_files = {a.path for a in MlflowClient(tracking_uri(registered)).list_artifacts(version.run_id, "onnx")}
    assert "onnx/model.onnx" in onnx_files


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_png(registered, tmp_path):
    path, _ = a_test_image(registered)
    port = free_port()
    env = {**project_env(registered), "MLFLOW_TRACKING_URI": tracking_uri(registered)}
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=registered, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
                time.sleep(1)
        else:  # alive but silent: say so with its output, not with the next request's URLError
            pytest.fail(f"the server did not answer /ping in 120 s: {log.read_text()[-3000:]}")
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(path.read_bytes()).decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already (the assert above)
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    prediction = answer["predictions"][0]
    champion_probs = prediction["probabilities"]
    assert prediction["label"] in ("circle", "square", "triangle")
    assert abs(sum(champion_probs) - 1) < 1e-4
    # the tiny model is weak, so compare with what the same model says in-process
    from pipeline.serving.classifier import ImageClassifier

    local = ImageClassifier(shipped_checkpoint(registered)).predict([path.read_bytes()])
    assert prediction["label"] == local.label[0]


@pytest.mark.slow
def test_second_evaluate_registers_no_duplicate_and_lineage_prints(registered):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(registered), registry_uri=tracking_uri(registered))
    before = client.search_model_versions(f"name = '{MODEL}'")
    run([DVC, "repro", "-f", "evaluate", "-s"], registered)
    after = client.search_model_versions(f"name = '{MODEL}'")
    assert len(after) == len(before) == 1
    log = [json.loads(line) for line in (registered / "metrics/promotions.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["promote"] and log[0]["reason"] == "first version"
    out = run([sys.executable, "-m", "pipeline", "lineage", "1"], registered).stdout
    version = after[0]
    assert version.tags["git_commit"] in out and "dvc repro" in out
    keys = ["data_hash", "params_hash", "finetune_run_id", "prepare_run_id"]
    if version.tags["shipped"] == "finetuned":  # a head-only model has no study to name
        keys.append("optuna_study")
    for key in keys:
        assert version.tags[key] and version.tags[key] != "unknown" and version.tags[key] in out


def test_promotion_log_records_a_fresh_stores_version_1_once(tmp_path, monkeypatch):
    """The log is committed and the store is not: a fresh clone registers v1 again, and its
    decision must be logged even though an older store's v1 already has a line — once, also when
    a kill between the append and the completion tag makes the next run finish the registration."""
    from mlflow import MlflowClient

    from pipeline.tracking.registry import finish_registration

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri())).info.run_id
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, (tmp_path / "model").as_uri(), run_id=run_id)
    log = tmp_path / "promotions.jsonl"
    older_store = {"model": MODEL, "version": 1, "promote": True, "reason": "first version", "time": "2026-12-01"}
    log.write_text(json.dumps(older_store) + "\n")
    record = {"model": MODEL, "version": 1, "champion_version": None, "promote": True, "reason": "first version"}

    finish_registration(MODEL, version, record, log)
    client.delete_model_version_tag(MODEL, "1", "registration_complete")  # as if killed before the tag
    finish_registration(MODEL, client.get_model_version(MODEL, "1"), record, log)

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line.get("run_id") for line in lines] == [None, run_id]
    assert set(client.get_model_version(MODEL, "1").aliases) == {"champion", "challenger"}


class Exploit:
    """Unpickling this writes a marker file: proof that a loader ran foreign code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickles_where_weights_belong_never_run(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.model.backbones import build_backbone
    from pipeline.model.checkpoints import load_classifier

    marker = tmp_path / "marker"
    payload = pickle.dumps(Exploit(marker))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.json").write_text(json.dumps({
        "format_version": 1, "backbone": "resnet18", "backbone_weights": "none", "num_features": 512,
        "classes": ["a", "b"], "image_size": 32, "input_config": {}, "k": 0}))
    (checkpoint / "model.safetensors").write_bytes(payload)
    with pytest.raises(PipelineError, match="not a safetensors"):
        load_classifier(checkpoint)
    evil_pt = tmp_path / "weights.pt"
    import torch

    torch.save({"weight": Exploit(marker)}, evil_pt)
    with pytest.raises(PipelineError, match="not a tensor-only weights file"):
        build_backbone("resnet18", str(evil_pt))
    assert not marker.exists()
