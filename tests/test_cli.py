import os
import subprocess
import sys

import pytest
from conftest import ROOT

# bad input: part of the fault suite; slow: each starts `python -m pipeline`
pytestmark = [pytest.mark.fault, pytest.mark.slow]


def test_help_lists_stages_and_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for command in ("shapes", "prepare", "extract", "audit", "train_head", "finetune", "evaluate",
                    "predict", "export", "noise-bench"):
        assert command in out


def test_bad_params_give_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\nsurprise: 2\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "prepare"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "surprise" in lines[0]


def test_unwritable_output_is_one_line(tmp_path):
    """A file where the output folder must go (the same for root, unlike chmod)."""
    import shutil

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "pipeline", "shapes"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_inputs_name_the_file(tmp_path):
    import shutil

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = subprocess.run([sys.executable, "-m", "pipeline", "train_head"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PIPELINE_HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data/features/meta.json" in result.stderr
