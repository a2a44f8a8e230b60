"""Stage runs end in the state that says what happened, even when the signal lands inside MLflow."""

import subprocess
import sys

import pytest
from conftest import ROOT, project_env

pytestmark = pytest.mark.fault

# SIGTERM delivered while MLflow's SQL store executes a statement of the stage's own logging —
# the window that left a run FAILED (MLflow wrapped the exception) instead of KILLED.
SIGTERM_INSIDE_A_STORE_CALL = """
import os, signal, sqlalchemy
from mlflow.tracking._tracking_service.utils import _get_store
from pipeline import tracking

try:
    with tracking.stage_run("probe", "sigterm-probe", {}):
        deliver = lambda *args: os.kill(os.getpid(), signal.SIGTERM)
        sqlalchemy.event.listen(_get_store().engine, "before_cursor_execute", deliver, once=True)
        tracking.log_metrics({"loss": 1.0})
        raise SystemExit("SIGTERM was not delivered inside the store call")
except tracking.Terminated:
    pass
runs = tracking.client().search_runs([tracking.setup("sigterm-probe")])
print([run.info.status for run in runs])
"""


def test_sigterm_inside_an_mlflow_store_call_ends_the_run_killed(tmp_path):
    env = {**project_env(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_A_STORE_CALL], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['KILLED']"
