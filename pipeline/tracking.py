"""Everything MLflow: store URI, stage runs, nested trial runs, batched metric logs, registry."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

from pipeline import interrupts
from pipeline.errors import PipelineError
from pipeline.paths import mlruns_dir

# MLflow's defaults retry an unreachable server for ~4 minutes; a user wants to know in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


# What MLflow costs a stage, in wall seconds: start-up (importing MLflow, opening or creating
# the store) and calls (every log, registry and run call the stage makes).
_overhead = {"startup": 0.0, "calls": 0.0}
_timing = {"depth": 0}  # nesting of clocked sections: only the outermost counts


@contextlib.contextmanager
def _clock(bucket: str) -> Iterator[None]:
    """Add the wall time of the block to _overhead[bucket] (not when inside another clock)."""
    if _timing["depth"]:
        yield
        return
    _timing["depth"] += 1
    started = time.perf_counter()
    try:
        yield
    finally:
        _timing["depth"] -= 1
        _overhead[bucket] += time.perf_counter() - started


def _import_mlflow() -> None:
    """Import MLflow here, first (the CLI imports this module before a stage's), so its import
    time is counted; pandas, which every stage uses anyway, is imported before the clock starts."""
    import pandas  # noqa: F401

    with _clock("startup"):
        import mlflow  # noqa: F401


_import_mlflow()


def timed(fn):
    """Count the wall time of a tracking call, so each stage can report its MLflow overhead; a
    SIGTERM arriving meanwhile is raised when it returns (interrupts)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _clock("calls"), interrupts.store_call():
            return fn(*args, **kwargs)

    return wrapper


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's own SQLite store, as an absolute path."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = mlruns_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root() -> str:
    return (mlruns_dir() / "artifacts").as_uri()


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def setup_uri() -> str:
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def store_lock():
    """Serialises creating the local stores: several workers starting at once on a new SQLite
    file otherwise race on creating its tables."""
    from filelock import FileLock

    mlruns_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(mlruns_dir() / ".create.lock"), timeout=120)


def setup(experiment: str) -> str:
    """Point mlflow at our store and experiment; return the experiment id. Fails fast, clearly."""
    with _clock("startup"):  # the first call opens (or creates) the store
        return _setup(experiment)


def _setup(experiment: str) -> str:
    import mlflow

    uri = setup_uri()
    try:
        with store_lock():
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                location = None if uri.startswith("http") else artifact_root()
                exp_id = mlflow.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = found.experiment_id
    except Exception as exc:
        raise PipelineError(
            f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}) — start the server "
            "or fix MLFLOW_TRACKING_URI"
        ) from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


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
def stage_run(stage: str, experiment: str, params: dict, tags: dict | None = None) -> Iterator:
    """An MLflow run for one stage; ends FINISHED, FAILED (exception) or KILLED (SIGTERM/^C)."""
    import mlflow

    experiment_id = setup(experiment)
    reap_dead_runs(experiment_id)
    previous = signal.signal(signal.SIGTERM, interrupts.raise_terminated)
    try:
        with _clock("calls"), interrupts.store_call():
            # created with its owner tags in one write: a signal landing inside start_run leaves
            # nothing _end_all_runs cannot find
            run = mlflow.start_run(run_name=stage, tags={
                "stage": stage, "git_commit": git_commit(), **process_tags(), **(tags or {})})
        log_params(params)
        yield run
    except KeyboardInterrupt:  # ^C, or SIGTERM (Terminated)
        _end_all_runs("KILLED", experiment_id)
        raise
    except BaseException:
        _end_all_runs("FAILED", experiment_id)
        raise
    else:
        startup, calls = _overhead["startup"], _overhead["calls"]
        log_metrics({"tracking_overhead_seconds": startup + calls, "tracking_startup_seconds": startup,
                     "tracking_calls_seconds": calls})
        with interrupts.store_call():
            mlflow.end_run("FINISHED")
        print(f"{stage}: MLflow took {startup + calls:.2f}s of this stage (start-up {startup:.2f}s: "
              f"import + store; calls {calls:.2f}s)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_all_runs(status: str, experiment_id: str) -> None:
    """End the stage run and any nested run still open above it (a signal can land between a
    trial's start_run and its own handler), so none of this process's runs is left RUNNING."""
    import mlflow

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
    while mlflow.active_run() is not None:
        mlflow.end_run(status)
    mine = f"attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}' and tags.pid = '{os.getpid()}'"
    for run in client().search_runs([experiment_id], filter_string=mine, max_results=1000):
        client().set_terminated(run.info.run_id, status)


@timed
def log_params(params: dict) -> None:
    """Log a flat dict of params in batches."""
    import mlflow

    _log_batch(mlflow.active_run().info.run_id, params=params)


def as_metrics(metrics: dict[str, float], step: int = 0) -> list:
    """MLflow Metric entities stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


@timed
def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None):
    import mlflow

    _log_batch(run_id or mlflow.active_run().info.run_id, metrics=as_metrics(metrics, step or 0))


@timed
def set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags(tags)


@timed
def log_dict(data: dict, name: str) -> None:
    import mlflow

    mlflow.log_dict(data, name)


@timed
def log_artifact(path: str) -> None:
    import mlflow

    mlflow.log_artifact(path)


@timed
def log_artifacts(folder: str) -> None:
    """Every file of a folder, at the run's artifact root."""
    import mlflow

    mlflow.log_artifacts(folder)


@timed
def download_artifact(run_id: str, artifact_path: str, dst_path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst_path)


@timed
def start_child_run(run_name: str, parent_run_id: str, tags: dict):
    import mlflow

    return mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, nested=True, tags=tags)


@timed
def end_run(status: str) -> None:
    """End the active run with status."""
    import mlflow

    mlflow.end_run(status)


CURVES = ("train_loss", "val_loss", "val_accuracy")


def curve_metrics(history) -> list:
    """Per-epoch curves as MLflow metrics, one step per epoch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, float(getattr(r, name)), now, r.epoch) for r in history for name in CURVES]


@timed
def log_curve(history, run_id: str | None = None) -> None:
    """Per-epoch curves as steps, all in one batched call."""
    import mlflow

    _log_batch(run_id or mlflow.active_run().info.run_id, metrics=curve_metrics(history))


class RunLog:
    """Params, metrics and tags of one run, held back and written together in one batch when
    `every` seconds have passed since the last write, and on flush(). A trial of second-long
    epochs then costs one store write instead of one per epoch; a slow trial's curves still
    reach the UI as it trains."""

    def __init__(self, run_id: str, every: float = 10.0):
        self.run_id, self.every = run_id, every
        self.params: dict = {}
        self.metrics: list = []
        self.tags: dict = {}
        self.last_write = time.monotonic()

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.metrics += as_metrics(metrics, step)

    def log_curve(self, history) -> None:
        self.metrics += curve_metrics(history)
        if time.monotonic() - self.last_write >= self.every:
            self.flush()

    @timed
    def flush(self) -> None:
        if self.params or self.metrics or self.tags:
            _log_batch(self.run_id, self.metrics, self.params, self.tags)
        self.params, self.metrics, self.tags = {}, [], {}
        self.last_write = time.monotonic()


def _log_batch(run_id: str, metrics=(), params: dict | None = None, tags: dict | None = None) -> None:
    """One store write per batch within MLflow's limits (1000 entries, 100 params and tags)."""
    from mlflow.entities import Param, RunTag

    metrics = list(metrics)
    params_list = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
    tags_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    while metrics or params_list or tags_list:
        batch_params, params_list = params_list[:100], params_list[100:]
        batch_tags, tags_list = tags_list[: 100 - len(batch_params)], tags_list[100 - len(batch_params):]
        room = 1000 - len(batch_params) - len(batch_tags)
        batch_metrics, metrics = metrics[:room], metrics[room:]
        client().log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags,
                           synchronous=True)


def flatten(prefix: str, data: dict) -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = value
    return out


def record_run(stage: str, run_id: str) -> None:
    from pipeline.atomic import write_json
    from pipeline.paths import stage_run_record

    write_json(stage_run_record(stage), {"run_id": run_id})


def recorded_run(stage: str) -> str | None:
    """The MLflow run id the stage last recorded (for lineage), if any."""
    import json

    from pipeline.paths import stage_run_record

    path = stage_run_record(stage)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_id")
