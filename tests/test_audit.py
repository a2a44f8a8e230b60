"""The audit stage on a tiny real project: planted mislabels and a planted train/test near-duplicate
are found, `exclude` takes them out of training only, and DVC re-runs the stage only when its inputs
or params change."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, TINY, make_project, run
from PIL import Image, ImageEnhance

from pipeline.data.datasets import split_of
from pipeline.data.images import content_hash

pytestmark = pytest.mark.slow
DVC = str(BIN / "dvc")
# an easy task (no clutter), so the out-of-fold model is sure of itself and a wrong label stands out
SHAPES = {**TINY["shapes"], "images_per_class": 40, "clutter": 0}
MISLABELLED = 3


def train_images(folder: Path) -> list[Path]:
    params = yaml.safe_load((folder.parents[2] / "params.yaml").read_text())["data"]
    return [p for p in sorted(folder.glob("*.png"))
            if split_of(content_hash(p.read_bytes()), params["val_fraction"], params["test_fraction"]) == "train"]


def near_copy_in_test(original: Path, params: dict) -> bytes:
    """A slightly brightened copy of `original` whose content hash puts it in the test split."""
    image = Image.open(original).convert("RGB")
    for step in range(1, 400):
        buffer = io.BytesIO()
        ImageEnhance.Brightness(image).enhance(1 + step / 1000).save(buffer, format="PNG")
        data = buffer.getvalue()
        if split_of(content_hash(data), params["val_fraction"], params["test_fraction"]) == "test":
            return data
    raise AssertionError("no brightening put the copy in the test split")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A project on its own folder of images, with planted mislabels and a leaking near-duplicate."""
    project = make_project(tmp_path_factory.mktemp("audit") / "project", {"shapes": SHAPES})
    run([DVC, "repro", "shapes"], project)
    mine = project / "data" / "mine"
    shutil.copytree(project / "data" / "shapes", mine)
    moved = []
    for image in train_images(mine / "circle")[:MISLABELLED]:  # circles filed as squares
        target = mine / "square" / f"mislabelled_{image.name}"
        image.rename(target)
        moved.append(target.relative_to(mine).as_posix())
    params = yaml.safe_load((project / "params.yaml").read_text())
    original = train_images(mine / "triangle")[0]
    (mine / "triangle" / "near_copy.png").write_bytes(near_copy_in_test(original, params["data"]))
    params["data"]["source"] = "data/mine"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run([DVC, "repro", "audit"], project).stdout
    return project, moved, original.relative_to(mine).as_posix(), output


def audit_outputs(project: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    audit = project / "data" / "audit"
    return (pd.read_csv(audit / "label_issues.csv"), pd.read_csv(audit / "near_duplicates.csv"),
            json.loads((audit / "excluded.json").read_text()),
            json.loads((project / "metrics" / "audit.json").read_text()))


def test_planted_mislabels_are_flagged_with_the_right_suggestion(audited):
    project, moved, _, _ = audited
    issues, _, excluded, counts = audit_outputs(project)
    found = issues.set_index("path").reindex(moved)
    assert found.given.eq("square").all() and found.suggested.eq("circle").all(), issues.head(10)
    # and not much besides: the clean images of this easy task are not flagged wholesale
    assert len(issues) <= 3 * MISLABELLED, issues
    assert counts["label_issues"] == len(issues) and counts["label_issues_train"] >= MISLABELLED
    assert excluded == {"action": "report", "rows": [], "images": []}  # report: training keeps them


def test_a_near_duplicate_across_train_and_test_is_reported_as_leakage(audited):
    project, _, original, _ = audited
    _, pairs, _, counts = audit_outputs(project)
    leak = pairs[pairs.cross_split]
    assert {tuple(sorted((r.path_a, r.path_b))) for r in leak.itertuples()} == {
        tuple(sorted((original, "triangle/near_copy.png")))}
    (row,) = leak.itertuples()
    assert {row.split_a, row.split_b} == {"train", "test"} and row.similarity >= 0.93
    assert counts["train_test_pairs"] == 1 and counts["cross_split_pairs"] == 1


def test_exclude_drops_the_flagged_training_images_only(audited, tmp_path):
    project, moved, original, _ = audited
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["audit"]["action"] = "exclude"
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([DVC, "repro", "audit"], copy)
    issues, _, excluded, counts = audit_outputs(copy)
    excluded_paths = {e["path"] for e in excluded["images"]}
    assert set(moved) | {original} <= excluded_paths  # the mislabels and the train side of the leak
    assert excluded_paths == set(issues.path[issues.split == "train"]) | {original}
    assert "triangle/near_copy.png" not in excluded_paths  # the test image stays: scores stay comparable
    manifest = pd.read_csv(copy / "data" / "prepared" / "manifest.csv")
    assert set(manifest.split.iloc[excluded["rows"]]) == {"train"}
    assert counts["excluded_train_images"] == len(excluded_paths)
    # what train_head and finetune read: every training image but the excluded ones
    cwd = Path.cwd()
    os.chdir(copy)
    try:
        from pipeline.model import features

        used = features.source("train", 0)
        assert len(used) == int((manifest.split == "train").sum()) - len(excluded_paths)
        assert len(features.source("val", 0)) == int((manifest.split == "val").sum())
    finally:
        os.chdir(cwd)
    assert (copy / "data" / "mine" / moved[0]).is_file()  # the user's folder is never rewritten


def test_the_stage_reruns_only_when_features_or_its_params_change(audited, tmp_path):
    project, _, _, first = audited
    assert "Running stage 'audit'" in first
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    run([DVC, "repro", "train_head"], copy)
    again = run([DVC, "repro", "train_head"], copy).stdout
    assert "Running stage" not in again  # nothing changed: nothing re-runs
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["audit"]["duplicate_similarity"] = 0.99
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run([DVC, "repro", "train_head"], copy).stdout
    # a new audit in report mode excludes nothing new, so training is not redone for it
    assert "Running stage 'audit'" in changed and "Running stage 'train_head'" not in changed
    params["extract"]["views"] = 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refeatured = run([DVC, "repro", "audit"], copy).stdout
    assert "Running stage 'extract'" in refeatured and "Running stage 'audit'" in refeatured
