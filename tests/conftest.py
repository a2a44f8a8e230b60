"""Shared fixtures: a tiny but real project (git + DVC + params) in a temp folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

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
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in env:  # C/N threads, as pytest_configure gives this process
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("OPTUNA_STORAGE", None)
    env.pop("PIPELINE_HOME", None)
    return env


def free_port() -> int:
    """A local port nothing listens on (the probe socket is closed when this returns): for a
    server to take, or to stand for a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def optuna_trial_ids(project: Path, state: str | None = None) -> set[int]:
    """The project's study trials (all, or those in `state`, e.g. "RUNNING"), read without Optuna
    so that a test can poll while a stage writes: empty while the database or its tables do not
    exist yet, or while it is locked for a moment."""
    db = project / "mlruns" / "optuna.db"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db, timeout=1) as connection:
            rows = connection.execute("select trial_id, state from trials").fetchall()
    except sqlite3.Error:  # tables not created yet, locked for a moment, a file just being created
        return set()
    return {trial_id for trial_id, s in rows if state is None or s == state}


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
    plots = [p for p in sorted((project / "plots").iterdir()) if p.suffix != ".png"]  # figures: drawn from these
    for path in sorted((project / "metrics").glob("*.json")) + plots:
        found[str(path.relative_to(project))] = path.read_text()
    binaries = [project / "data/prepared/images.npy", project / "models/head/model.safetensors",
                project / "models/finetuned/model.safetensors", *sorted((project / "data/features").glob("*.npy"))]
    for path in binaries:
        found[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    config = json.loads((project / "models/finetuned/model.json").read_text())
    config.pop("trial_run_id")  # an MLflow run id: new on every run by design
    found["models/finetuned/model.json"] = config
    return found


class ReferenceRun(NamedTuple):
    project: Path  # the project the run left; tests may go on from it (the end-to-end test does)
    output: str  # its stdout, then stderr
    fingerprint: dict
    pristine: Path  # a copy of the project taken as the run ended, for clean_copy


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> ReferenceRun:
    """One clean `dvc repro` of the tiny project, the only whole clean run of the shared group.

    The end-to-end test goes on from it; the fault tests compare their runs with its fingerprint;
    the registry, MLflow and experiment tests start from copies of it (clean_copy).
    """
    project = make_project(tmp_path_factory.mktemp("reference") / "project")
    result = run([str(BIN / "dvc"), "repro"], project)
    pristine = tmp_path_factory.mktemp("reference-pristine") / "project"
    shutil.copytree(project, pristine, symlinks=True)
    return ReferenceRun(project, result.stdout + result.stderr, fingerprint(project), pristine)


def clean_copy(reference: ReferenceRun, destination: Path) -> Path:
    """The reference run's project as its `dvc repro` left it — git history, DVC cache, MLflow and
    Optuna stores — whatever other tests did to the shared one since: one pipeline run, version 1
    registered as champion. Copying costs a second; a second clean run cost a whole `dvc repro`.
    New MLflow artifacts land in the reference project's mlruns/artifacts: the copied store
    records its experiment's artifact location as an absolute path."""
    shutil.copytree(reference.pristine, destination, symlinks=True)
    return destination


WEIGHT_DECAY_SWEEP = ("finetune.weight_decay", "[1.0e-05, 0.001]")  # what weight_decay_experiment sets


@pytest.fixture(scope="session")
def weight_decay_experiment(reference_run, tmp_path_factory) -> tuple[Path, str]:
    """A clean copy of the reference run, committed, then `dvc exp run -n wd-sweep -S
    finetune.weight_decay=…`: (project, the experiment's output). Its store holds two pipeline
    runs, the clean one and the experiment, which re-ran only what that param feeds. Read-only
    for its tests (the end-to-end and MLflow UI ones)."""
    project = clean_copy(reference_run, tmp_path_factory.mktemp("experiment") / "project")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "first pipeline run"], project)
    key, value = WEIGHT_DECAY_SWEEP
    result = run([str(BIN / "dvc"), "exp", "run", "-n", "wd-sweep", "-S", f"{key}={value}"], project, timeout=900)
    return project, result.stdout + result.stderr


# `make test` runs the suite in parallel (pytest-xdist, --dist loadgroup). Tests sharing an
# expensive fixture (a whole `dvc repro`) go to one worker, so each is built once.
SHARED_FIXTURE_GROUPS = {"reference_run": "clean_runs", "weight_decay_experiment": "clean_runs",
                         "trained_head": "trained_head", "audited": "audited",
                         "basic_auth_server": "auth_server"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):  # `-p no:xdist`: nothing to schedule
        return
    for item in items:
        groups = {SHARED_FIXTURE_GROUPS[name] for name in item.fixturenames if name in SHARED_FIXTURE_GROUPS}
        if groups:
            (group,) = groups  # a test needing two groups' fixtures would build one of them twice
            item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out the groups first (most tests first), then single tests in collection order,
    # each to the first worker down to its last two tests. Longest first: tests marked `long`
    # (minutes alone), then modules holding slow tests, then the fast-only ones to fill the
    # workers' ends. Otherwise a long test reached late lands behind a worker's long group and ends
    # the run alone on one core (the retrain flow behind the trained_head group: 760 s against
    # 580 s on the other two workers, 2026-12-07). Other modules stay in one piece, so their
    # module-scoped fixtures are built once (one a `long` test used would be built twice).
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (not item.get_closest_marker("long"), item.module not in slow_modules))


# --- the cost rule: `-m "not slow"` (`make test-fast`) starts no stage, dvc or server ----------
# A test that starts `dvc`, a pipeline stage or another Python interpreter it launches itself
# (`python -m pipeline ...`, `python -c <probe>`), an MLflow / Optuna-dashboard / web server, or
# PostgreSQL is marked `@pytest.mark.slow`. `fault` does not imply slow: most of the fault suite is
# cheap bad-input checks that belong in the fast loop, so a fault test that starts one of these
# carries both marks. Enforced, not by hand: while a test not marked slow runs (its fixtures
# included), starting such a program, or listening on a socket, fails it with "mark this test
# slow: it starts ...", and a fixture seen starting one (reference_run, trained_head, ...) fails
# every unmarked test that requests it, cached or not.
# Allowed in fast tests: cheap helper programs — `git` (init, rev-parse, commit), `actionlint`, the
# compiler and tools torch.compile calls — and interpreters that libraries start themselves.
SLOW_PROGRAMS = {"dvc", "mlflow", "optuna", "optuna-dashboard", "gunicorn", "uvicorn", "waitress-serve",
                 "postgres", "pg_ctl", "pg_ctlcluster", "initdb", "docker"}
SLOW_MODULES = {"pipeline", "dvc", "mlflow", "optuna", "optuna_dashboard", "gunicorn", "uvicorn", "waitress"}
_PYTHON = re.compile(r"python[0-9.]*")
_TESTS = Path(__file__).resolve().parent
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def slow_command(argv: list[str], from_tests: bool) -> str | None:
    """What makes this command slow-only (its first words), or None when it is cheap.
    from_tests: a test (or a conftest helper) starts it, not a library the test calls."""
    if not argv:
        return None
    program = Path(argv[0]).name
    if program in SLOW_PROGRAMS:
        return " ".join([program, *argv[1:3]])
    if program in ("sh", "bash") and "-c" in argv[:-1]:
        return slow_command(shlex.split(argv[argv.index("-c") + 1]), from_tests)
    if _PYTHON.fullmatch(program) or argv[0] == sys.executable:
        if "-m" in argv[:-1] and argv[argv.index("-m") + 1].split(".")[0] in SLOW_MODULES:
            return " ".join(["python", *argv[argv.index("-m"):][:3]])
        if from_tests:  # a fresh interpreter importing the project: seconds each
            return " ".join(["python", *(a if len(a) < 40 else "<script>" for a in argv[1:3])])
    return None


def _argv(args) -> list[str]:
    if isinstance(args, str):
        try:
            return shlex.split(args)
        except ValueError:
            return [args]
    if isinstance(args, bytes | os.PathLike):
        return [os.fsdecode(args)]
    return [os.fsdecode(a) for a in args]


def _in_stdlib(filename: str) -> bool:
    path = Path(filename).resolve()
    return filename.startswith("<frozen ") or (
        path.is_relative_to(_STDLIB) and not {"site-packages", "dist-packages"} & set(path.parts))


def _started_by_tests() -> bool:
    """Is the nearest caller outside the standard library (subprocess.run, os.popen, ...) a test?"""
    frame = sys._getframe(2)  # above popen_init
    while frame is not None and _in_stdlib(frame.f_code.co_filename):
        frame = frame.f_back
    return frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(_TESTS)


class CostGuard:
    """Installed for the whole session (each xdist worker has its own); strict only while a test
    not marked slow runs."""

    def __init__(self):
        self.strict_for: str | None = None  # nodeid of the unmarked test running now
        self.fixtures: list[str] = []  # fixtures being set up now (innermost last)
        self.slow_fixtures: dict[str, str] = {}  # fixture name → what it was seen starting
        self._popen_init = subprocess.Popen.__init__
        self._listen = socket.socket.listen

    def install(self) -> None:
        guard = self

        def popen_init(popen, args, *rest, **kwargs):
            what = slow_command(_argv(args), _started_by_tests())
            if what is not None:
                popen._child_created = False  # nothing started: Popen.__del__ has nothing to reap
                guard.started(what)
            guard._popen_init(popen, args, *rest, **kwargs)

        def listen(sock, *args):
            guard.started(f"a server (listening on {sock.getsockname()})")
            return guard._listen(sock, *args)

        subprocess.Popen.__init__ = popen_init
        socket.socket.listen = listen

    def uninstall(self) -> None:
        subprocess.Popen.__init__ = self._popen_init
        socket.socket.listen = self._listen

    def started(self, what: str) -> None:
        for name in self.fixtures:
            self.slow_fixtures.setdefault(name, what)
        if self.strict_for is not None:
            pytest.fail(f"mark this test slow: it starts `{what}`", pytrace=False)


COST_GUARD = CostGuard()


def pytest_configure(config):
    COST_GUARD.install()
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # N workers on C cores: C/N torch threads each (more: OpenMP spin-waits on busy cores)
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


def pytest_unconfigure(config):
    COST_GUARD.uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    COST_GUARD.strict_for = None if item.get_closest_marker("slow") else item.nodeid
    try:
        return (yield)
    finally:
        COST_GUARD.strict_for = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if COST_GUARD.strict_for is None:
        return
    for name in item.fixturenames:
        if name in COST_GUARD.slow_fixtures:
            pytest.fail(f"mark this test slow: its fixture {name} starts `{COST_GUARD.slow_fixtures[name]}`",
                        pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    COST_GUARD.fixtures.append(fixturedef.argname)
    try:
        return (yield)
    finally:
        COST_GUARD.fixtures.pop()
