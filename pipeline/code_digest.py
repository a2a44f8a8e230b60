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


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Names of the pipeline modules `module` imports, directly or not, itself included.

    Imports inside functions count too: they run on the same path.
    """
    seen = set() if seen is None else seen
    name = "__init__" if module == "__version__" else module
    path = PACKAGE / f"{name}.py"
    if name in seen or not path.exists():
        return seen
    seen.add(name)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            parts = node.module.split(".")
            for child in [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]:
                imported_modules(child, seen)
    return seen


def code_digest(module: str) -> str:
    """sha256 of the source of every module in `module`'s import closure (name and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(imported_modules(module)):
        digest.update(name.encode() + b"\0")
        digest.update((PACKAGE / f"{name}.py").read_bytes())
    return digest.hexdigest()
