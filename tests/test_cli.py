import subprocess
import sys

from conftest import ROOT


def test_help_lists_stages_and_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for command in ("shapes", "prepare", "extract", "train_head", "finetune", "evaluate",
                    "predict"):
        assert command in out


def test_bad_params_give_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\nsurprise: 2\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "prepare"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "surprise" in lines[0]
