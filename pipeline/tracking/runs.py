"""MLflow runs: a stage's run (ends FINISHED, FAILED or KILLED), nested trial runs, reaping the
runs of processes that died, and which run each stage last recorded (for lineage)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

from pipeline import interrupts
from pipeline.tracking.logs import log_metrics, log_params
from pipeline.tracking.preflight import check_reachable
from pipeline.tracking.resend import create_once
from pipeline.tracking.store import _clock, _overhead, client, defer_run, setup, timed, without_retries


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


class StageRun:
    """A stage's MLflow run, opened by start(): at once, or — for a stage that logs only at its
    end — after the work, so the work does not wait for MLflow's import (seconds). The run
    carries the stage's real start time either way."""

    def __init__(self, stage: str, experiment: str, params: dict, tags: dict | None, run_name: str | None):
        self.stage, self.experiment, self.params = stage, experiment, params
        self.tags = {"stage": stage, "git_commit": git_commit(), **process_tags(),
                     "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""), **(tags or {})}
        self.run_name = run_name or stage
        self.started_ms = int(time.time() * 1000)
        self.run = None
        self.experiment_id = None

    @property
    def info(self):
        return self.start().info

    def start(self):
        """The active MLflow run (opened on the first call)."""
        defer_run(None)
        if self.run is None:
            self.experiment_id = setup(self.experiment)
            reap_dead_runs(self.experiment_id)
            with _clock("calls"):
                self.run = open_run(self.experiment_id, self.run_name, self.tags, start_time=self.started_ms)
            log_params(self.params)
        return self.run

    def end(self, status: str) -> None:
        """End as status (FAILED, KILLED); a run not yet opened is opened first, so a failed or
        killed deferred stage is on record too — unless MLflow itself is what failed. Best effort,
        one try per call: the stage's own error is the one to show."""
        with without_retries():
            try:
                self.start()
            except Exception:  # the store is unreachable
                if self.run is None:
                    return
            try:
                _end_all_runs(status, self.experiment_id)
            except Exception as exc:
                print(f"warning: MLflow run of {self.stage} not ended {status} ({type(exc).__name__}); "
                      "the next stage on this host ends it KILLED", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict, tags: dict | None = None,
              run_name: str | None = None, defer: bool = False) -> Iterator[StageRun]:
    """An MLflow run for one stage; ends FINISHED, FAILED (exception) or KILLED (SIGTERM/^C, which
    the stage's loops raise at their next safe point: interrupts).

    defer=True: MLflow is imported and the run opened at the block's first use of it (`.start()`,
    `.info`) — a stage that logs only at its end does its work first. Otherwise at once."""
    began = time.perf_counter()
    with interrupts.stop_on_signals():
        handle = StageRun(stage, experiment, params, tags, run_name)
        # a server that is down or refuses us fails now, with its reason, not after the work
        # (deferred) or as MLflow's error (a run opened at once); there is no run to end yet
        check_reachable(experiment)
        try:
            if defer:
                defer_run(handle.start)  # opened by the block's first log call, or .start()/.info
            else:
                handle.start()
            yield handle
            handle.start()  # a block that logged nothing still leaves its run
        except KeyboardInterrupt:  # ^C, or SIGTERM (Terminated)
            handle.end("KILLED")
            raise
        except BaseException:
            handle.end("FAILED")
            raise
        import mlflow

        startup, calls = _overhead["startup"], _overhead["calls"]
        log_metrics({"tracking_overhead_seconds": startup + calls, "tracking_startup_seconds": startup,
                     "tracking_calls_seconds": calls})
        mlflow.end_run("FINISHED")
        waited = "after the work" if defer else "before the work"
        took = time.perf_counter() - began
        print(f"{stage}: MLflow took {startup + calls:.2f}s of this stage's {took:.1f}s (start-up {startup:.2f}s: "
              f"import + store, {waited}; calls {calls:.2f}s)", flush=True)


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
    return open_run(experiment_of(parent_run_id), run_name, tags, parent_run_id=parent_run_id)


@functools.cache
def experiment_of(run_id: str) -> str:
    """A run's experiment id (it never changes: asked once per parent, not once per trial)."""
    return client().get_run(run_id).info.experiment_id


def open_run(experiment_id: str, run_name: str, tags: dict, start_time: int | None = None,
             parent_run_id: str | None = None):
    """Create a run and make it the active one (nested under parent_run_id, if given), with the
    tags mlflow.start_run would add. Created once even through a failing server: each run carries
    the id of the request that made it (create_request_id), so a resend first looks for it."""
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    request_id = uuid.uuid4().hex
    tags = {**tags, "create_request_id": request_id}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    tags = resolve_tags(tags)  # the user, source and git tags
    if start_time is None:
        start_time = int(time.time() * 1000)

    def made_by_this_request():
        found = client().search_runs([experiment_id], filter_string=f"tags.create_request_id = '{request_id}'")
        return found[0] if found else None

    created = create_once(
        lambda: client().create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name),
        made_by_this_request,
    )
    return mlflow.start_run(run_id=created.info.run_id, nested=parent_run_id is not None)


@timed
def end_run(status: str) -> None:
    """End the active run with status."""
    import mlflow

    mlflow.end_run(status)




