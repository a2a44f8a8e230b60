"""The package's arrows point one way: stages use everything else; nothing below a stage imports
one, and tracking (registry included) never imports serving. And the package imports itself in
the one form that code_digest reads (a stage's DVC deps and its study's identity come from it)."""

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


SUB_PACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
BELOW_THE_STAGES = ["", *(name for name in SUB_PACKAGES if name != "stages")]


def test_every_sub_package_is_checked():
    assert {"data", "model", "search", "tracking", "serving", "reporting", "tools", "audit"} <= set(BELOW_THE_STAGES)


@pytest.mark.parametrize("folder", BELOW_THE_STAGES)
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


def other_import_forms(path) -> list[str]:
    """Imports of the package that code_digest.imported_modules does not follow: `import pipeline...`
    and relative imports (`from . import x`). Each as `line: source`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pipeline" for a in node.names):
            found.append(f"{node.lineno}: import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
    return found


def test_the_package_imports_itself_only_as_code_digest_reads():
    """`from pipeline.x import y` only: code_digest follows that form to find the files a stage
    runs (its dvc.yaml deps, tests/test_dvc_deps.py) and the files a study's identity hashes. A
    module imported another way would be missing from both: editing it would neither re-run the
    stage nor start a new study."""
    offenders = {path.relative_to(ROOT).as_posix(): other_import_forms(path) for path in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_other_import_forms_are_found(tmp_path):
    """The check above can fail: each form it forbids is seen."""
    source = tmp_path / "sample.py"
    source.write_text("import os\nimport pipeline.paths\nfrom . import paths\nfrom ..model import engine\n"
                      "from pipeline import paths\n")
    assert other_import_forms(source) == ["2: import pipeline.paths", "3: from . import ...",
                                          "4: from ..model import ..."]
