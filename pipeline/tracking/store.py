"""The MLflow store: its URI (always absolute), the client, creating the experiment, and the clock
that counts what MLflow costs each stage."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from pipeline.errors import PipelineError, reason, redacted
from pipeline.paths import mlruns_dir
from pipeline.progress import quiet
from pipeline.tracking import preflight
from pipeline.tracking.resend import create_once

# MLflow's own HTTP retries (7, backing off: ~4 minutes) and 120 s timeout are kept on purpose:
# a stage that logs after minutes of work waits out a slow or restarting server instead of losing
# the work. A server that is down or refuses us is found in milliseconds before any work, by
# preflight (setup_uri asks it when the stage has not).
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# ...except when a failed or stopped stage records its end: one try, 10 s (see without_retries)
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def without_retries() -> Iterator[None]:
    """MLflow's HTTP calls in the block try once (unless the user set these variables): ending a
    failed or stopped run is best effort — the next stage reaps a run left RUNNING — and must not
    keep a stage that SIGTERM stopped, or whose server is gone, for MLflow's 4 minutes of retries
    (a CI runner kills it after seconds). MLflow reads them at each call."""
    added = [name for name in NO_RETRIES if name not in os.environ]
    os.environ.update({name: NO_RETRIES[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


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


def import_mlflow() -> None:
    """Import MLflow under the start-up clock. Nothing imports it at module level, so a stage
    pays the import (4-6 s on a cold disk, ~2 s warm) when it first talks to MLflow — after its
    work, for stages that log only at their end (runs.stage_run(defer=True)). pandas, which the
    stages use anyway, is imported before the clock starts."""
    import pandas  # noqa: F401

    with _clock("startup"):
        import mlflow  # noqa: F401


# the stage run waiting to be opened (runs.stage_run(defer=True)); the first log call opens it
_deferred = {"start": None}


def defer_run(start) -> None:
    """Register (or with None, clear) the opener of a deferred stage run."""
    _deferred["start"] = start


def open_deferred_run() -> None:
    """Open the deferred stage run, if one waits: a deferred stage's first log call does this,
    so nothing is logged into no run (or into a run MLflow would start on its own)."""
    start, _deferred["start"] = _deferred["start"], None
    if start is not None:
        start()


def timed(fn):
    """Count the wall time of a tracking call, so each stage can report its MLflow overhead."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        open_deferred_run()  # a deferred stage's first tracking call: start-up is counted as such
        with _clock("calls"):
            return fn(*args, **kwargs)

    return wrapper


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's own SQLite store, as an absolute path."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = mlruns_dir()
    store.mkdir(parents=True, exist_ok=True)
    database = store / "mlflow.db"
    if not database.exists():
        _create_sqlite_store(database)
    return f"sqlite:///{database}"


def _create_sqlite_store(database) -> None:
    """Create the project's SQLite store whole or not at all: MLflow builds its tables in many
    transactions, and a process killed among them used to leave a half-made file that every later
    process found unreachable. The tables are built in a temporary file, then renamed into place."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with _clock("startup"), store_lock():
        if database.exists():  # another process made it while this one waited
            return
        for stale in database.parent.glob(f".{database.name}.*.tmp*"):  # left by a killed creator
            stale.unlink(missing_ok=True)
        partial = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        try:
            made = SqlAlchemyStore(f"sqlite:///{partial}", artifact_root())
            made.engine.dispose()  # every connection closed before the file moves
            os.replace(partial, database)
        except Exception as exc:  # a read-only or full disk: one line, not MLflow's traceback
            raise PipelineError(
                f"cannot create the MLflow store {database} ({type(exc).__name__}: {exc}) — make "
                f"{database.parent} writable, or set MLFLOW_TRACKING_URI to a store you can write"
            ) from None


def artifact_root() -> str:
    return (mlruns_dir() / "artifacts").as_uri()


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def setup_uri() -> str:
    import mlflow

    preflight.check_once()
    if quiet():  # MLflow's own download bars, silenced with ours (CI logs, dvc repro with PIPELINE_QUIET)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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


# MLflow's UI opens an experiment in the view its kind names (the values its UI source accepts
# include genai_development and custom_model_development); unset, it guesses — GenAI, here
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def setup(experiment: str) -> str:
    """Point mlflow at our store and experiment; return the experiment id. Fails fast, clearly."""
    import_mlflow()
    with _clock("startup"):  # the first call opens (or creates) the store
        return _setup(experiment)


def create_experiment(name: str, location: str | None) -> str:
    """Its id; one that another machine (or a try whose answer failed) made meanwhile is taken, so
    resending this is safe."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        made = mlflow.get_experiment_by_name(name) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if made is None:
            raise
        return made.experiment_id


def _setup(experiment: str) -> str:
    import mlflow

    uri = setup_uri()
    try:
        with store_lock():
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                location = None if uri.startswith("http") else artifact_root()
                exp_id = create_once(lambda: create_experiment(experiment, location))
            else:
                exp_id = found.experiment_id
                for key, value in EXPERIMENT_KIND.items():
                    if key not in found.tags:  # made before this release, or by MLflow itself
                        client().set_experiment_tag(exp_id, key, value)
    except Exception as exc:  # MLflow's message quotes the URL it called: its password hidden
        raise PipelineError(f"MLflow tracking store {redacted(uri)} is unreachable or refused the request "
                            f"({type(exc).__name__}: {reason(exc, uri)}) — start the server or fix "
                            "MLFLOW_TRACKING_URI") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


