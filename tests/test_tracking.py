"""Stage runs end in the state that says what happened, even when the signal lands inside MLflow
or Optuna's storage; RunLog batches stay within MLflow's limits."""

import subprocess
import sys

import pytest
from conftest import ROOT, project_env

pytestmark = [pytest.mark.fault, pytest.mark.slow]  # slow: each probe is a fresh interpreter with MLflow


def last_line_printed_by(script: str, project, *args: str) -> str:
    """Run a probe script in a fresh process (its own signal handlers, stores under project)."""
    env = {**project_env(project), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]

# A signal delivered while MLflow's SQL store executes a statement of the stage's own logging —
# the window that once left a run FAILED (MLflow wrapped the exception) or SQLite locked. The
# handler only sets the stop flag (pipeline.interrupts): the call completes, the stage stops at
# its next safe point, and the run ends KILLED with what it logged intact.
SIGNAL_INSIDE_A_STORE_CALL = """
import os, signal, sys, sqlalchemy
from mlflow.tracking._tracking_service.utils import _get_store
from pipeline import interrupts
from pipeline.tracking import logs, runs, store

reached = []
try:
    with runs.stage_run("probe", "signal-probe", {}):
        deliver = lambda *args: os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        sqlalchemy.event.listen(_get_store().engine, "before_cursor_execute", deliver, once=True)
        logs.log_metrics({"loss": 1.0})
        reached.append("after the store call")
        interrupts.check()
        reached.append("after the safe point")
except KeyboardInterrupt as stopped:
    reached.append(type(stopped).__name__)
(run,) = store.client().search_runs([store.setup("signal-probe")])
print(reached, run.info.status, run.data.metrics.get("loss"))
"""


@pytest.mark.parametrize(("signal_name", "raised"), [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_inside_an_mlflow_store_call_stops_at_the_next_safe_point(tmp_path, signal_name, raised):
    printed = last_line_printed_by(SIGNAL_INSIDE_A_STORE_CALL, tmp_path, signal_name)
    assert printed == f"['after the store call', '{raised}'] KILLED 1.0"


# SIGTERM delivered while Optuna's storage writes a trial's intermediate value: the write
# completes, the trial stops at the next safe point, and the clean-up marks the trial FAIL and
# the run KILLED without waiting on a lock (nothing was cut in half).
SIGTERM_INSIDE_AN_OPTUNA_CALL = """
import os, signal, time, sqlalchemy, optuna
from optuna.trial import TrialState
from pipeline import interrupts
from pipeline.search import storage
from pipeline.tracking import runs, store

rdb = storage.make_storage(f"sqlite:///{os.getcwd()}/optuna.db")
s = optuna.create_study(storage=rdb, study_name="probe")
reached = []
started = time.monotonic()
try:
    with runs.stage_run("probe", "sigterm-probe", {}):
        trial = s.ask()
        try:
            deliver = lambda *args: os.kill(os.getpid(), signal.SIGTERM)
            sqlalchemy.event.listen(rdb.engine, "before_cursor_execute", deliver, once=True)
            trial.report(0.25, 1)
            reached.append("after report")
            interrupts.check()
            reached.append("after the safe point")
        except KeyboardInterrupt:
            s.tell(trial, state=TrialState.FAIL)
            raise
except KeyboardInterrupt:
    pass
(frozen,) = s.trials
mlruns = store.client().search_runs([store.setup("sigterm-probe")])
print(reached, frozen.state.name, frozen.intermediate_values, [run.info.status for run in mlruns],
      time.monotonic() - started < 30)
"""


def test_sigterm_inside_an_optuna_storage_call_lets_it_finish_then_stops(tmp_path):
    printed = last_line_printed_by(SIGTERM_INSIDE_AN_OPTUNA_CALL, tmp_path)
    assert printed == "['after report'] FAIL {1: 0.25} ['KILLED'] True"


# A RunLog holding more than one MLflow batch may carry (1000 entries, 100 params and tags).
# The SQLite store accepts any batch; a tracking server applies MLflow's limits, checked here on
# every request that reaches the store (MLflow's client does the splitting).
BIG_RUN_LOG = """
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.validation import _validate_batch_log_limits
from pipeline.tracking import logs, runs, store

unchecked = SqlAlchemyStore.log_batch
def checked(self, run_id, metrics, params, tags):  # each request the store gets, as a server checks it
    _validate_batch_log_limits(metrics, params, tags)
    return unchecked(self, run_id, metrics, params, tags)
SqlAlchemyStore.log_batch = checked

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


# A stage that logs only at its end (prepare, extract, audit, train_head) does its work before
# MLflow is imported (issue 17: 4-6 s per stage on a GPU box); its run still spans the work,
# and a failure during the work still leaves a FAILED run.
DEFERRED_STAGE_RUN = """
import sys, time
import pipeline.stages.prepare, pipeline.stages.extract, pipeline.stages.audit, pipeline.stages.train_head
import pipeline.stages.evaluate, pipeline.stages.finetune
from pipeline.tracking import logs, runs, store

imported = ["mlflow" in sys.modules]  # after every stage module's imports
before = time.time()
with runs.stage_run("probe", "deferred-probe", {"p": 1}, defer=True) as stage:
    imported.append("mlflow" in sys.modules)  # during the work
    time.sleep(0.5)
    logs.log_metrics({"m": 2.0})  # the first tracking call opens the run
    imported.append("mlflow" in sys.modules)
    logs.set_tags({"t": "x"})
    run_id = stage.info.run_id
try:
    with runs.stage_run("probe-fails", "deferred-probe", {}, defer=True):
        raise ValueError("the work failed")
except ValueError:
    pass
found = {r.info.run_name: r for r in store.client().search_runs([store.setup("deferred-probe")])}
ok, failed = found["probe"], found["probe-fails"]
print(imported, len(found), ok.info.run_id == run_id, ok.info.status, ok.data.params["p"], ok.data.metrics["m"],
      ok.data.tags["t"], failed.info.status, abs(ok.info.start_time / 1000 - before) < 0.5,
      (ok.info.end_time - ok.info.start_time) >= 500)
"""


def test_a_deferred_stage_run_imports_mlflow_after_the_work_and_still_spans_it(tmp_path):
    printed = last_line_printed_by(DEFERRED_STAGE_RUN, tmp_path)
    assert printed == "[False, False, True] 2 True FINISHED 1 2.0 x FAILED True True"


# SIGKILL while MLflow builds a new SQLite store's tables (it takes many transactions, seconds on a
# slow disk): the store is built in a temporary file and renamed, so the next process finds no
# store and makes a whole one — before, it found a half-made file "unreachable" forever after.
# argv[1]: the SQL statement to be killed at (0: none; print how many building the store took)
KILLED_WHILE_CREATING_THE_STORE = """
import os, signal, sys, sqlalchemy
import mlflow.store.db.utils as db_utils
from pipeline.tracking import store

statements, kill_at = [], int(sys.argv[1])

def killed_in_the_middle_of_the_migrations(engine):
    def count(*args):
        statements.append(1)
        if len(statements) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    sqlalchemy.event.listen(engine, "before_cursor_execute", count)
    upgrade(engine)

upgrade, db_utils._upgrade_db = db_utils._upgrade_db, killed_in_the_middle_of_the_migrations
store.setup("creation-probe")
print(len(statements))
"""

AFTER_THE_KILL = """
import sys
from pipeline.paths import mlruns_dir
from pipeline.tracking import logs, runs, store

left = sorted(p.name for p in mlruns_dir().iterdir() if "mlflow.db" in p.name)
with runs.stage_run(sys.argv[1], "creation-probe", {}):
    logs.log_metrics({"m": 1.0})
found = store.client().search_runs([store.setup("creation-probe")])
print(left, [(r.info.run_name, r.info.status, r.data.metrics["m"]) for r in found][::-1])
"""


def test_a_process_killed_while_creating_the_store_leaves_none_half_made(tmp_path):
    env = {**project_env(tmp_path), "PYTHONPATH": str(ROOT)}
    (tmp_path / "whole").mkdir()
    built = subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING_THE_STORE, "0"], cwd=tmp_path / "whole",
                           env=env, capture_output=True, text=True, timeout=120, check=True)
    # halfway through MLflow's migrations (~1,700 statements in 3.17), whatever their number in this
    # release: inside a migration SQLite cannot undo
    halfway = int(built.stdout.split()[-1]) // 2
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING_THE_STORE, str(halfway)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # the killed creator's temporary file is what it left; the next process makes the store
    first = last_line_printed_by(AFTER_THE_KILL, tmp_path, "first")
    assert first.endswith("[('first', 'FINISHED', 1.0)]") and first.startswith("['.mlflow.db.")
    printed = last_line_printed_by(AFTER_THE_KILL, tmp_path, "second")
    assert printed == "['mlflow.db'] [('first', 'FINISHED', 1.0), ('second', 'FINISHED', 1.0)]"


# MLflow draws its own progress bar when it downloads an artifact (finetune fetches trial weights):
# with PIPELINE_QUIET our bars are off, and so must MLflow's be, or CI logs fill with them.
DOWNLOAD_A_LOGGED_ARTIFACT = """
import pathlib, sys, tempfile
from pipeline.tracking import logs, runs, store
with runs.stage_run("probe", "download-probe", {}) as run:
    pathlib.Path("weights.txt").write_text("w")
    logs.log_artifact("weights.txt")
with tempfile.TemporaryDirectory() as tmp:
    logs.download_artifact(run.info.run_id, "weights.txt", tmp)
print("downloaded")
"""


@pytest.mark.parametrize("quiet", ["1", "0"])
def test_mlflow_download_bars_are_silenced_with_ours(tmp_path, quiet):
    env = {**project_env(tmp_path), "PYTHONPATH": str(ROOT), "PIPELINE_QUIET": quiet}
    env.pop("CI", None)
    env.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    result = subprocess.run([sys.executable, "-c", DOWNLOAD_A_LOGGED_ARTIFACT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "downloaded", result.stderr[-2000:]
    assert ("Downloading artifacts" in result.stderr) == (quiet == "0"), result.stderr[-2000:]
