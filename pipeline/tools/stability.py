"""`python -m pipeline stability`: how much the shipped model depends on chance.

Runs the default pipeline from train_head on (train_head → finetune → evaluate, the real stage
commands) once per seed, and once more for the first seed with the cached activations perturbed
by relative noise of bfloat16's size — what another CPU's float kernels do to them. Each run
lives in its own scratch project (own params, MLflow store and Optuna study) that shares this
project's prepared data and reads a copy of its features, so nothing here is touched. Prints the
shipped model's test accuracy, chosen k and time per run, the spread, and the targets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.progress import say

BF16_RELATIVE_NOISE = 2.0**-8  # bfloat16 keeps 8 significant bits: its rounding is this relative size
STAGES = ("train_head", "finetune", "evaluate")


@dataclass
class Outcome:
    label: str
    seed: int
    head_only: float
    shipped_model: str
    shipped: float
    chosen_k: int
    seconds: float

    @property
    def gain(self) -> float:
        return self.shipped - self.head_only


def perturb_features(source: Path, target: Path, seed: int) -> None:
    """Copy extract's outputs, every float array multiplied by (1 + u), u ~ U(±2^-8)."""
    rng = np.random.default_rng(seed)
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        array = np.load(path) if path.suffix == ".npy" else None
        if array is not None and array.dtype.kind == "f":
            noise = rng.uniform(-BF16_RELATIVE_NOISE, BF16_RELATIVE_NOISE, array.shape).astype(np.float32)
            np.save(target / path.name, (array.astype(np.float32) * (1 + noise)).astype(array.dtype))
        else:
            shutil.copy2(path, target / path.name)


def scratch_project(root: Path, params: dict, seed: int, noise: bool) -> Path:
    """A project folder for one run: its own params and stores, this project's inputs."""
    root.mkdir(parents=True)
    (root / paths.PARAMS).write_text(yaml.safe_dump({**params, "seed": seed}, sort_keys=False))
    (root / "data").mkdir()
    (root / paths.PREPARED_DIR).symlink_to(paths.PREPARED_DIR.resolve(), target_is_directory=True)
    if noise:
        perturb_features(paths.FEATURES_DIR, root / paths.FEATURES_DIR, seed)
    else:
        shutil.copytree(paths.FEATURES_DIR, root / paths.FEATURES_DIR)
    shutil.copytree(paths.AUDIT_DIR, root / paths.AUDIT_DIR)  # which training images to leave out
    return root


def run_stages(project: Path, stages, label: str) -> float:
    """Run the stage commands in a scratch project with its own stores; seconds taken."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    env |= {"PIPELINE_HOME": str(project), "PIPELINE_QUIET": "1"}
    start = time.perf_counter()
    for stage in stages:
        result = subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=project, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise PipelineError(f"{stage} failed in run {label}:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def run_from_train_head(project: Path, label: str, seed: int) -> Outcome:
    seconds = run_stages(project, STAGES, f"{label} (seed {seed})")
    evaluate = json.loads((project / paths.stage_metrics("evaluate")).read_text())
    finetune = json.loads((project / paths.stage_metrics("finetune")).read_text())
    return Outcome(label, seed, evaluate["head_only"]["accuracy"], evaluate["shipped"]["model"],
                   evaluate["shipped"]["accuracy"], finetune["chosen_k"], seconds)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| run | seed | head-only test | shipped | shipped test | gain | chosen k | time |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for o in outcomes:
        lines.append(f"| {o.label} | {o.seed} | {o.head_only:.4f} | {o.shipped_model} | {o.shipped:.4f} | "
                     f"{o.gain * 100:+.1f} pts | {o.chosen_k} | {o.seconds:.0f} s |")
    return "\n".join(lines)


def verdict(seeded: list[Outcome], twin: Outcome | None) -> str:
    """The spread and the issue's targets, from the runs just made."""
    shipped = [o.shipped for o in seeded]
    gains = [o.gain for o in seeded]
    not_worse = sum(o.shipped >= o.head_only for o in seeded)
    spread = (max(shipped) - min(shipped)) * 100
    checks = [
        (f"shipped >= head-only in {not_worse} of {len(seeded)} seeds", not_worse == len(seeded)),
        (f"mean gain {np.mean(gains) * 100:+.1f} pts (target >= +8)", np.mean(gains) >= 0.08),
        (f"spread of shipped test accuracy (max - min) {spread:.1f} pts (target <= 4)", spread <= 4.0 + 1e-9),
    ]
    if twin is not None:
        diff = abs(twin.shipped - seeded[0].shipped) * 100
        checks.append((f"noise-perturbed twin differs by {diff:.1f} pts (target <= 2)", diff <= 2.0 + 1e-9))
    return "\n".join(f"- [{'x' if ok else ' '}] {text}" for text, ok in checks)


def main(seeds: list[int], noise: bool = True, keep: Path | None = None) -> None:
    if not paths.FEATURES_META.is_file() or not paths.IMAGES.is_file() or not paths.EXCLUDED.is_file():
        raise PipelineError("stability needs the prepared data and cached features — run `dvc repro audit` first")
    params = yaml.safe_load(paths.PARAMS.read_text())
    plan = [(f"seed {s}", s, False) for s in seeds] + ([(f"seed {seeds[0]} + bf16 noise", seeds[0], True)]
                                                        if noise else [])
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="stability-"))
    outcomes = []
    try:
        for i, (label, seed, perturbed) in enumerate(plan):
            project = scratch_project(work / f"run-{i}", params, seed, perturbed)
            outcomes.append(run_from_train_head(project, label, seed))
            o = outcomes[-1]
            say(f"stability: {label}: shipped {o.shipped_model} test {o.shipped:.4f} (head-only "
                f"{o.head_only:.4f}), k={o.chosen_k}, {o.seconds:.0f} s")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    seeded = [o for o, (_, _, perturbed) in zip(outcomes, plan, strict=True) if not perturbed]
    twins = [o for o, (_, _, perturbed) in zip(outcomes, plan, strict=True) if perturbed]
    print(table(outcomes))
    print(verdict(seeded, twins[0] if twins else None))
