"""Which pipeline modules a module runs (its import closure) and a digest of their source.

dvc.yaml lists the closure as each stage's deps (tests/test_dvc_deps.py checks it), and the
Optuna study is named after the digest of the trial path's closure, so a change to the code
that trains or scores trials starts a new study instead of reusing stale trials.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def module_file(dotted: str) -> Path | None:
    """pipeline/<a>/<b>.py (or the package's __init__.py) for "a.b"; None if neither exists."""
    base = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Files (relative to pipeline/, e.g. "model/engine.py") that `module` ("stages.finetune")
    imports, directly or not, itself and the packages' __init__.py files included.

    Imports inside functions count too: they run on the same path.
    """
    seen = set() if seen is None else seen
    path = module_file(module)
    if path is None:
        return seen
    relative = path.relative_to(PACKAGE).as_posix()
    if relative in seen:
        return seen
    seen.add(relative)
    parts = module.split(".") if module else []
    for depth in range(len(parts)):  # importing a.b runs pipeline/__init__.py and a/__init__.py
        imported_modules(".".join(parts[:depth]), seen)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            target = node.module.removeprefix("pipeline").removeprefix(".")
            imported_modules(target, seen)
            for alias in node.names:  # `from pipeline.model import engine` imports a module
                child = f"{target}.{alias.name}" if target else alias.name
                if module_file(child) is not None and module_file(child) != module_file(target):
                    imported_modules(child, seen)
    return seen


def code_digest(module: str) -> str:
    """sha256 of the source of every file in `module`'s import closure (name and bytes)."""
    digest = hashlib.sha256()
    for relative in sorted(imported_modules(module)):
        digest.update(relative.encode() + b"\0")
        digest.update((PACKAGE / relative).read_bytes())
    return digest.hexdigest()
