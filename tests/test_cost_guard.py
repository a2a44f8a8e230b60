"""The cost rule of tests/conftest.py: a test not marked slow cannot start dvc, a stage, a Python
interpreter of its own or a server — it fails saying to mark it slow. Git stays allowed."""

import socket
import subprocess
import sys

import pytest
from conftest import BIN, slow_command

MARK_IT_SLOW = pytest.fail.Exception


@pytest.mark.parametrize(("argv", "from_tests", "what"), [
    ([str(BIN / "dvc"), "repro", "train_head"], False, "dvc repro train_head"),
    (["dvc", "exp", "run", "--queue"], False, "dvc exp run"),
    ([sys.executable, "-m", "pipeline", "finetune"], False, "python -m pipeline finetune"),
    (["python3", "-m", "mlflow", "server"], False, "python -m mlflow server"),
    ([str(BIN / "mlflow"), "models", "serve", "-m", "models:/x@champion"], False, "mlflow models serve"),
    (["optuna-dashboard", "sqlite:///optuna.db"], False, "optuna-dashboard sqlite:///optuna.db"),
    (["pg_ctl", "start"], False, "pg_ctl start"),
    (["bash", "-c", "dvc repro"], False, "dvc repro"),
    ([sys.executable, "-c", "import pipeline"], True, "python -c import pipeline"),
    ([sys.executable, "-c", "x"], False, None),  # an interpreter a library starts itself
    (["git", "rev-parse", "HEAD"], True, None),
    ([str(BIN / "actionlint"), "retrain.yml"], True, None),
    (["g++", "-v"], False, None),
])
def test_what_counts_as_slow(argv, from_tests, what):
    assert slow_command(argv, from_tests) == what


def test_an_unmarked_test_cannot_start_dvc_or_an_interpreter_but_can_run_git(tmp_path):
    with pytest.raises(MARK_IT_SLOW, match=r"mark this test slow: it starts `dvc --version`"):
        subprocess.run([str(BIN / "dvc"), "--version"], capture_output=True)
    with pytest.raises(MARK_IT_SLOW, match=r"mark this test slow: it starts `python -m pipeline --help`"):
        subprocess.Popen([sys.executable, "-m", "pipeline", "--help"])
    with pytest.raises(MARK_IT_SLOW, match=r"mark this test slow: it starts `python -c print\(1\)`"):
        subprocess.check_output([sys.executable, "-c", "print(1)"])
    assert subprocess.run(["git", "init", "-q", str(tmp_path)]).returncode == 0


def test_an_unmarked_test_cannot_start_a_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # binding to find a free port is fine
        with pytest.raises(MARK_IT_SLOW, match="it starts `a server"):
            s.listen()


@pytest.mark.slow
def test_a_slow_test_may_start_them():
    out = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True, check=True)
    assert out.stdout == "1\n"
