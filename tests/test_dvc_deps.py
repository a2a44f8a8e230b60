"""dvc.yaml lists, for each stage, every pipeline module the stage imports (directly or not), so
changing a shared module re-runs exactly the stages that use it."""

import pytest
import yaml
from conftest import ROOT

from pipeline.code_digest import imported_modules

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_imports(stage):
    needed = {f"pipeline/{m}.py" for m in imported_modules(stage) | {"__main__"}}
    listed = set(STAGES[stage]["deps"])
    assert sorted(needed - listed) == []
