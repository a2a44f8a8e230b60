"""MLflow runs: a stage's run (ends FINISHED, FAILED or KILLED), nested trial runs, reaping the
runs of processes that died, and which run each stage last recorded (for lineage)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator

from pipeline import interrupts
from pipeline.tracking.logs import log_metrics, log_params
from pipeline.tracking.store import _clock, _overhead, client, setup, timed


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def process_tags() -> dict:
    """Who runs this run: lets a later process on this host close runs a SIGKILL left open."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def process_gone(owner: dict) -> bool:
    """Whether the process that process_tags() named ran on this host and is gone (never this one)."""
    pid = str(owner.get("pid", ""))
    return (owner.get("host") == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()
            and not pid_alive(int(pid)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@timed
def reap_dead_runs(experiment_id: str) -> int:
    """End as KILLED the RUNNING runs whose process on this host is gone (SIGKILL, power loss).

    Runs of other hosts are left alone: their trials are reaped through Optuna's heartbeat.
    """
    host = socket.gethostname()
    found = client().search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'",
        max_results=1000,
    )
    reaped = 0
    for run in found:
        if process_gone(run.data.tags):
            client().set_tag(run.info.run_id, "killed_reason", "process gone (reaped on restart)")
            client().set_terminated(run.info.run_id, "KILLED")
            reaped += 1
    return reaped


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict, tags: dict | None = None,
              run_name: str | None = None) -> Iterator:
    """An MLflow run for one stage; ends FINISHED, FAILED (exception) or KILLED (SIGTERM/^C, which
    the stage's loops raise at their next safe point: interrupts)."""
    import mlflow

    with interrupts.stop_on_signals():
        experiment_id = setup(experiment)
        reap_dead_runs(experiment_id)
        try:
            with _clock("calls"):
                run = mlflow.start_run(run_name=run_name or stage, tags={
                    "stage": stage, "git_commit": git_commit(), **process_tags(),
                    "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **(tags or {})})
            log_params(params)
            yield run
        except KeyboardInterrupt:  # ^C, or SIGTERM (Terminated)
            _end_all_runs("KILLED", experiment_id)
            raise
        except BaseException:
            _end_all_runs("FAILED", experiment_id)
            raise
        startup, calls = _overhead["startup"], _overhead["calls"]
        log_metrics({"tracking_overhead_seconds": startup + calls, "tracking_startup_seconds": startup,
                     "tracking_calls_seconds": calls})
        mlflow.end_run("FINISHED")
        print(f"{stage}: MLflow took {startup + calls:.2f}s of this stage (start-up {startup:.2f}s: "
              f"import + store; calls {calls:.2f}s)", flush=True)


def _end_all_runs(status: str, experiment_id: str) -> None:
    """End the stage run and any nested run still open above it, so none of this process's runs
    is left RUNNING."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run(status)
    mine = f"attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}' and tags.pid = '{os.getpid()}'"
    for run in client().search_runs([experiment_id], filter_string=mine, max_results=1000):
        client().set_terminated(run.info.run_id, status)


@timed
def start_child_run(run_name: str, parent_run_id: str, tags: dict):
    import mlflow

    return mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, nested=True, tags=tags)


@timed
def end_run(status: str) -> None:
    """End the active run with status."""
    import mlflow

    mlflow.end_run(status)




