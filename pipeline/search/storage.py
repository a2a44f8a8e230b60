"""Where the Optuna study lives and how it survives killed workers: storage (SQLite, PostgreSQL,
journal), heartbeats, and failing + retrying the trials of a worker that died."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pipeline.errors import PipelineError, reason, redacted
from pipeline.paths import mlruns_dir
from pipeline.search.study import PARAMETERS
from pipeline.tracking import runs


def storage_url() -> str:
    """OPTUNA_STORAGE (PostgreSQL URL for a team), else SQLite under the home mlruns/."""
    url = os.environ.get("OPTUNA_STORAGE")
    if url:
        return url
    mlruns_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns_dir() / 'optuna.db'}"


# Optuna 4.9 renamed the retry callback and RDBStorage's argument for it (the old names are
# deprecated until 6.0); pyproject admits Optuna 4.0, which has only the old ones.
if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
    _RetryStaleTrial = optuna.storages.RetryHeartbeatStaleTrialCallback
    _STALE_CALLBACK_ARGUMENT = "heartbeat_stale_trial_callback"
else:
    _RetryStaleTrial = optuna.storages.RetryFailedTrialCallback
    _STALE_CALLBACK_ARGUMENT = "failed_trial_callback"


def make_storage(url: str | None = None) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats: a killed worker's trial is failed and retried, not left RUNNING."""
    url = url or storage_url()
    if url.endswith(".log") or url.startswith("journal:"):
        path = url.removeprefix("journal:")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and documented
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=STALE_AFTER_SECONDS,
                **{_STALE_CALLBACK_ARGUMENT: close_and_retry},
            )
    except (SQLAlchemyError, ImportError, RuntimeError) as exc:  # RuntimeError: an old schema
        raise PipelineError(_cannot_open(url, exc)) from None


def _cannot_open(url: str, exc: BaseException) -> str:
    """One line naming the store (password hidden), the database's own reason, and the fix."""
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc  # the driver's error, not the wrapper's
    why = f"{type(cause).__name__}: {reason(cause, url)}"
    return f"Optuna storage {redacted(url)} cannot be opened ({why}) — {_fix(url, exc)}"


def _fix(url: str, exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return "install the database driver it names, or fix OPTUNA_STORAGE"
    if isinstance(exc, ArgumentError):
        return "fix OPTUNA_STORAGE (e.g. postgresql://user:password@host/db)"
    if url.startswith("sqlite"):
        return "check that the file's folder exists and is writable, or fix OPTUNA_STORAGE"
    return "start the database or fix OPTUNA_STORAGE"


def fail_stale_trials(s: optuna.Study) -> None:
    """Killed workers' trials: FAIL + retry (close_and_retry), not RUNNING forever.

    Trials of a dead process on this host are retried at once; others after the heartbeat's
    grace period. Retrying before any new trial is asked keeps a sequential study in slot order.
    """

    for trial in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if runs.process_gone(trial.user_attrs.get("worker", {})):
            try:
                if s._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    close_and_retry(s, trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another process got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(s)


def claim(trial: optuna.Trial) -> None:
    """Mark the trial as run by this process, so a successor on this host can tell it died."""

    trial.set_user_attr("worker", runs.process_tags())


HEARTBEAT_SECONDS = 2


STALE_AFTER_SECONDS = 8  # a trial silent this long has lost its worker (SIGKILL, crash, reboot)


with warnings.catch_warnings():  # "experimental" since Optuna 2.8; the documented way to retry
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _retry = _RetryStaleTrial(max_retry=3)


def close_and_retry(s: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A stale trial: end its MLflow run KILLED (not RUNNING forever), enqueue a retry with the
    same parameters so no trial is lost. A trial killed before it drew them all is retried with
    none: fixing the drawn ones and drawing the rest would take those out of the order the
    slot's seeded sampler draws them in, and the resumed study would differ from an unbroken one."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        from pipeline.tracking import store

        client = store.client()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "killed_reason", "worker stopped heartbeating; trial retried")
            client.set_terminated(run_id, "KILLED")
    if not set(PARAMETERS) <= trial.params.keys():
        trial = copy.copy(trial)
        trial.params, trial.distributions = {}, {}
    _retry(s, trial)


@contextlib.contextmanager
def heartbeat(s: optuna.Study, trial: optuna.Trial):
    """Record the trial's heartbeat every HEARTBEAT_SECONDS while it runs (what optimize() does
    for itself; our ask/tell loop must do it)."""
    storage = s._storage
    if not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial._trial_id)
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
