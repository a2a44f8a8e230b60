"""SIGTERM as an exception (errors.Terminated) that never lands inside a store call.

Raised at an arbitrary bytecode, the exception can cut a database call in half — between a
write and its commit or while a session closes — and leave a connection holding SQLite's write
lock: every later write, including the clean-up that marks the trial FAIL and the runs KILLED,
then waits out the busy timeout. So a signal that arrives while the main thread is inside a
store call (MLflow via tracking, Optuna via study's storage) is held and raised when the call
returns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator

from pipeline.errors import Terminated

_state = {"depth": 0, "pending": None}  # main thread's nesting of store calls; held signal


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler tracking.stage_run installs (Python runs it in the main thread)."""
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def store_call() -> Iterator[None]:
    """Hold SIGTERM for the duration of the block (main thread only; others never get signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            raise Terminated(f"signal {signum}")


def shield_methods(cls: type) -> type:
    """Class decorator: __init__ and every public instance method (own and inherited) run as
    store_calls."""
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        method = inspect.getattr_static(cls, name)
        if inspect.isfunction(method):  # not static/class methods, properties or attributes
            setattr(cls, name, _shielded(method))
    return cls


def _shielded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with store_call():
            return fn(*args, **kwargs)

    return wrapper
