"""The package's arrows point one way: stages use everything else; nothing below a stage imports
one, and tracking (registry included) never imports serving."""

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "pipeline"


def pipeline_imports(path) -> set[str]:
    """Dotted pipeline modules (or packages) a file imports, e.g. {"pipeline.tracking.store"}."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def files_under(folder: str) -> list:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.glob("*.py"))


@pytest.mark.parametrize("folder", ["", "data", "model", "search", "tracking", "serving", "reporting", "tools"])
def test_nothing_below_the_stages_imports_a_stage(folder):
    offenders = {path.relative_to(ROOT).as_posix(): sorted(i for i in pipeline_imports(path)
                                                           if i.startswith("pipeline.stages"))
                 for path in files_under(folder) if path.name != "__main__.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tracking_never_imports_serving():
    offenders = {path.name: sorted(i for i in pipeline_imports(path) if i.startswith("pipeline.serving"))
                 for path in files_under("tracking")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_stage_mains_are_short():
    """load → compute → atomic write → log: each stage's main() fits on a screen."""
    lengths = {}
    for path in files_under("stages"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("main"):
                lengths[f"{path.stem}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert lengths and {name: n for name, n in lengths.items() if n > 25} == {}
