"""Stage runs end in the state that says what happened, even when the signal lands inside MLflow
or Optuna's storage."""

import subprocess
import sys

import pytest
from conftest import ROOT, project_env

pytestmark = pytest.mark.fault


def last_line_printed_by(script: str, project) -> str:
    """Run a probe script in a fresh process (its own signal handlers, stores under project)."""
    env = {**project_env(project), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]

# SIGTERM delivered while MLflow's SQL store executes a statement of the stage's own logging —
# the window that left a run FAILED (MLflow wrapped the exception) instead of KILLED. The signal
# is held until the call returns (pipeline.interrupts), then raised.
SIGTERM_INSIDE_A_STORE_CALL = """
import os, signal, sqlalchemy
from mlflow.tracking._tracking_service.utils import _get_store
from pipeline.tracking import store
from pipeline.errors import Terminated

try:
    with runs.stage_run("probe", "sigterm-probe", {}):
        deliver = lambda *args: os.kill(os.getpid(), signal.SIGTERM)
        sqlalchemy.event.listen(_get_store().engine, "before_cursor_execute", deliver, once=True)
        logs.log_metrics({"loss": 1.0})
        raise SystemExit("SIGTERM was not delivered inside the store call")
except Terminated:
    pass
runs = store.client().search_runs([store.setup("sigterm-probe")])
print([run.info.status for run in runs])
"""


def test_sigterm_inside_an_mlflow_store_call_ends_the_run_killed(tmp_path):
    assert last_line_printed_by(SIGTERM_INSIDE_A_STORE_CALL, tmp_path) == "['KILLED']"


# SIGTERM delivered while Optuna's storage writes a trial's intermediate value: the write
# completes (a signal cutting a call in half could leave SQLite's write lock held, so the
# clean-up waited out the busy timeout), Terminated is raised as the call returns, and the
# clean-up marks the trial FAIL and the run KILLED.
SIGTERM_INSIDE_AN_OPTUNA_CALL = """
import os, signal, sqlalchemy, optuna
from optuna.trial import TrialState
from pipeline.search import study
from pipeline.tracking import store
from pipeline.errors import Terminated

storage = storage.make_storage(f"sqlite:///{os.getcwd()}/optuna.db")
s = optuna.create_study(storage=storage, study_name="probe")
reached = []
try:
    with runs.stage_run("probe", "sigterm-probe", {}):
        trial = s.ask()
        try:
            deliver = lambda *args: os.kill(os.getpid(), signal.SIGTERM)
            sqlalchemy.event.listen(storage.engine, "before_cursor_execute", deliver, once=True)
            trial.report(0.25, 1)
            reached.append("after report")
        except KeyboardInterrupt:
            s.tell(trial, state=TrialState.FAIL)
            raise
except Terminated:
    pass
(frozen,) = s.trials
runs = store.client().search_runs([store.setup("sigterm-probe")])
print(reached, frozen.state.name, frozen.intermediate_values, [run.info.status for run in runs])
"""


def test_sigterm_inside_an_optuna_storage_call_lets_it_finish_then_stops(tmp_path):
    assert last_line_printed_by(SIGTERM_INSIDE_AN_OPTUNA_CALL, tmp_path) == "[] FAIL {1: 0.25} ['KILLED']"


# A RunLog holding more than one MLflow batch may carry (1000 entries, 100 params and tags).
# The SQLite store accepts any batch; a tracking server applies MLflow's limits, checked here.
BIG_RUN_LOG = """
from mlflow import MlflowClient
from mlflow.utils.validation import _validate_batch_log_limits
from pipeline.tracking import store
from pipeline.errors import Terminated

unchecked = MlflowClient.log_batch
def checked(self, run_id, metrics=(), params=(), tags=(), **kwargs):
    _validate_batch_log_limits(metrics, params, tags)
    return unchecked(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
MlflowClient.log_batch = checked

with runs.stage_run("probe", "runlog-probe", {}) as run:
    log = logs.RunLog(run.info.run_id, every=3600)
    log.log_params({f"p{i}": i for i in range(150)})
    log.set_tags({f"t{i}": i for i in range(120)})
    for step in range(1250):
        log.log_metrics({"a": step, "b": -step}, step=step)
    before = store.client().get_run(run.info.run_id).data
    assert not before.metrics and "p0" not in before.params, "written before flush()"
    log.flush()
data = store.client().get_run(run.info.run_id).data
history = store.client().get_metric_history(run.info.run_id, "a")
print(len([k for k in data.params if k.startswith("p")]), len([k for k in data.tags if k.startswith("t")]),
      len(history), data.metrics["b"])
"""


def test_run_log_holds_back_then_writes_everything_within_mlflow_batch_limits(tmp_path):
    assert last_line_printed_by(BIG_RUN_LOG, tmp_path) == "150 120 1250 -1249.0"
