"""`python -m pipeline noise-bench`: how well the audit finds label errors we planted ourselves.

For each rate, a scratch project (own params and stores, as `stability` makes them) gets this
project's data with that fraction of *training* images relabelled to another class at random;
the real `audit` stage runs there, and its flagged training images are scored against the
planted ones (precision, recall). At one rate the rest of the pipeline (train_head → finetune →
evaluate) then runs twice on the same noisy labels — audit.action report and exclude — and the
shipped model's test accuracy of both is printed. Test labels are never touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.progress import say
from pipeline.tools.stability import STAGES, run_stages


@dataclass
class Detection:
    rate: float
    planted: int
    flagged: int
    found: int

    @property
    def precision(self) -> float:
        return self.found / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        return self.found / self.planted if self.planted else float("nan")


def noisy_project(root: Path, params: dict, rate: float, action: str, seed: int) -> set[int]:
    """A scratch project whose training labels are `rate` wrong; returns the planted manifest rows."""
    manifest = pd.read_csv(paths.MANIFEST)
    classes = json.loads(paths.CLASSES.read_text())["classes"]
    rng = np.random.default_rng(seed)
    train = manifest.index[manifest.split == "train"].to_numpy()
    planted = rng.choice(train, size=int(round(rate * len(train))), replace=False)
    shift = rng.integers(1, len(classes), size=len(planted))  # never the true class
    manifest.loc[planted, "label_index"] = (manifest.loc[planted, "label_index"] + shift) % len(classes)
    manifest.loc[planted, "label"] = [classes[i] for i in manifest.loc[planted, "label_index"]]

    root.mkdir(parents=True)
    audited = {**params, "audit": {**params["audit"], "action": action}}
    (root / paths.PARAMS).write_text(yaml.safe_dump(audited, sort_keys=False))
    prepared = root / paths.PREPARED_DIR
    prepared.mkdir(parents=True)
    for item in paths.PREPARED_DIR.iterdir():
        if item.name != paths.MANIFEST.name:
            (prepared / item.name).symlink_to(item.resolve())
    manifest.to_csv(prepared / paths.MANIFEST.name, index=False)
    features = root / paths.FEATURES_DIR
    shutil.copytree(paths.FEATURES_DIR, features)
    for split in ("train", "val", "test"):  # the labels extract cached follow the manifest
        rows = np.load(features / f"{split}_rows.npy")
        np.save(features / f"{split}_labels.npy", manifest.label_index.to_numpy()[rows])
    return {int(r) for r in planted}


def detection(project: Path, planted: set[int], rate: float) -> Detection:
    issues = pd.read_csv(project / paths.LABEL_ISSUES)
    flagged = set(issues.row[issues.split == "train"].astype(int))
    return Detection(rate, len(planted), len(flagged), len(flagged & planted))


def shipped_accuracy(project: Path) -> tuple[float, float]:
    result = json.loads((project / paths.stage_metrics("evaluate")).read_text())
    return result["shipped"]["accuracy"], result["head_only"]["accuracy"]


def main(rates: list[float], compare_rate: float | None, seed: int = 0, keep: Path | None = None) -> None:
    if not paths.FEATURES_META.is_file() or not paths.MANIFEST.is_file():
        raise PipelineError("noise-bench needs the prepared data and cached features — run `dvc repro extract` first")
    params = yaml.safe_load(paths.PARAMS.read_text())
    if compare_rate is not None and not 0 < compare_rate < 1:
        raise PipelineError(f"--compare-at {compare_rate} is not a fraction between 0 and 1 — give one like 0.05")
    if compare_rate is not None and not any(np.isclose(rate, compare_rate) for rate in rates):
        rates = sorted([*rates, compare_rate])  # the comparison needs that rate's detection run
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="noise-bench-"))
    rows, accuracy = [], {}
    try:
        for rate in rates:
            project = work / f"rate-{rate:g}-report"
            planted = noisy_project(project, params, rate, "report", seed)
            run_stages(project, ["audit"], f"audit at {rate:.0%} planted noise")
            rows.append(detection(project, planted, rate))
            d = rows[-1]
            say(f"noise-bench: {rate:.0%}: flagged {d.flagged} training images, {d.found} of {d.planted} planted")
            if compare_rate is not None and np.isclose(rate, compare_rate):
                excluded = work / f"rate-{rate:g}-exclude"
                noisy_project(excluded, params, rate, "exclude", seed)  # same seed: the same planted rows
                for label, folder, stages in (("report", project, STAGES), ("exclude", excluded, ["audit", *STAGES])):
                    run_stages(folder, stages, f"{label} at {rate:.0%} planted noise")
                    accuracy[label] = shipped_accuracy(folder)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(render(rows, accuracy, compare_rate))


def render(rows: list[Detection], accuracy: dict, compare_rate: float | None) -> str:
    lines = ["| planted noise | planted | flagged (train) | found | precision | recall |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {d.rate:.0%} | {d.planted} | {d.flagged} | {d.found} | {d.precision:.2f} | {d.recall:.2f} |"
              for d in rows]
    if accuracy:
        lines += ["", f"At {compare_rate:.0%} planted noise, shipped model's test accuracy (head-only in brackets):"]
        lines += [f"- audit.action {label}: {shipped:.4f} ({head:.4f})" for label, (shipped, head) in accuracy.items()]
    return "\n".join(lines)
