"""dvc.yaml lists, for each stage, every pipeline module the stage imports (directly or not), so
changing a shared module re-runs exactly the stages that use it."""

import ast

import pytest
import yaml
from conftest import ROOT

PACKAGE = ROOT / "pipeline"


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    name = "__init__" if module == "__version__" else module
    path = PACKAGE / f"{name}.py"
    if name in seen or not path.exists():
        return seen
    seen.add(name)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            parts = node.module.split(".")
            for child in [parts[1]] if len(parts) > 1 else [a.name for a in node.names]:
                imported_modules(child, seen)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_imports(stage):
    needed = {f"pipeline/{m}.py" for m in imported_modules(stage) | {"__main__"}}
    listed = set(STAGES[stage]["deps"])
    assert sorted(needed - listed) == []
