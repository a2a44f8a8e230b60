"""The Optuna study is named after the code that trains and scores trials, so new code never
re-assembles stale trials."""

import shutil

from conftest import ROOT

from pipeline import code_digest
from pipeline.params import load_params
from pipeline.search import study


def study_name_with_package(monkeypatch, package) -> str:
    monkeypatch.setattr(code_digest, "PACKAGE", package)
    return study.study_name(load_params(ROOT / "params.yaml"), "data-hash", "inputs-hash")


def test_editing_a_module_of_the_trial_path_starts_a_new_study(tmp_path, monkeypatch):
    package = tmp_path / "pipeline"
    shutil.copytree(ROOT / "pipeline", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = study_name_with_package(monkeypatch, package)
    assert study_name_with_package(monkeypatch, package) == before  # deterministic

    report = package / "stages" / "report.py"  # not on the trial path: same study
    report.write_text(report.read_text() + "\n# a comment\n")
    assert study_name_with_package(monkeypatch, package) == before

    assert "model/engine.py" in code_digest.imported_modules("stages.finetune")
    engine = package / "model" / "engine.py"  # the train loop every trial runs
    engine.write_text(engine.read_text().replace("label_smoothing=label_smoothing", "label_smoothing=0.0"))
    assert study_name_with_package(monkeypatch, package) != before
