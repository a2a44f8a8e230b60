"""dvc.yaml lists, for each stage, every pipeline module the stage imports (directly or not), so
changing a shared module re-runs exactly the stages that use it."""

import pytest
import yaml
from conftest import ROOT

from pipeline.code_digest import imported_modules

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_imports(stage):
    needed = {f"pipeline/{m}" for m in imported_modules(f"stages.{stage}") | {"__main__.py"}}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith("pipeline/")}
    assert sorted(needed - listed) == [], "missing: a change to these would not re-run the stage"
    assert sorted(listed - needed) == [], "not imported (or gone): a change to these re-runs it for nothing"
