"""`python -m pipeline bench` with the precisions a CUDA device chooses (bf16 autocast for the frozen
pass *and* for training), on the CPU, so CI guards that path on machines without a GPU.

What crashed on the H200 (issue 17) was device placement — bench left its models on the CPU while
the batches went to CUDA, and once moved, BatchNorm folding built its check input on the CPU —
which no CPU-only run can reproduce: this test passes with those bugs too. The fixes (every model
and batch on the runtime's device, folding on the CPU before the move) still need a run on a GPU:
`.ci/gpu-check bench`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import BIN, make_project, project_env, run

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_bench_runs_with_the_precisions_a_gpu_would_choose(tmp_path):
    project = make_project(tmp_path / "project")
    run([str(BIN / "dvc"), "repro", "extract"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"]["precision"] = "bf16"  # what select_runtime picks on CUDA with bf16 support
    params["finetune"]["precision"] = "bf16"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--k", "1", "--epochs", "1",
                             "--trials", "1"], cwd=project, env=project_env(project), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "ours" in out and "(bf16, channels_last" in out, out[-2000:]
    # bf16 training through an unfrozen block (k=1), then the ratio table
    assert re.search(r"trial k=1: naive .*, ours .*, trained in bf16\)", out), out[-2000:]
    assert "trial k=1, seconds" in out and "study of 1 trials, seconds" in out
    assert "| augmentation, images/s |" in out and "peak extra host memory" in out
    assert "| decoding the folder (prepare), images/s |" in out
