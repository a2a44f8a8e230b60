"""SIGTERM and SIGINT set a stop flag; the loops check it at safe points and stop there.

As Lightning does: the handler only records the request, so a signal never lands inside a store
call (MLflow's SQL, Optuna's storage) — an exception raised at an arbitrary bytecode there could
leave a connection holding SQLite's write lock, or be wrapped by the library into an ordinary
error. The loops call `check()` per batch, per trial and per image; it raises errors.Terminated
(SIGTERM) or KeyboardInterrupt (SIGINT), which end the runs KILLED and fail + retry the trial.
Further signals while stopping are ignored; SIGKILL is the hard stop (its runs and trials are
reaped by the next run, see tracking.runs and search.storage).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from pipeline.errors import Terminated

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []  # the first signal received, once one is
_installed = [0]  # nesting of stop_on_signals blocks (the CLI's, a stage run's)


def request_stop(signum: int, frame) -> None:
    """The handler: remember the first signal; the next safe point raises it."""
    if not _requested:
        _requested.append(signum)


def stop_requested() -> bool:
    return bool(_requested)


def check() -> None:
    """A safe point: stop here if a signal came (Terminated for SIGTERM, KeyboardInterrupt for ^C)."""
    if not _requested:
        return
    if _requested[0] == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"signal {_requested[0]}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handlers for the block (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread() or _installed[0]:
        _installed[0] += 1  # already installed by an outer block: that one restores them
        try:
            yield
        finally:
            _installed[0] -= 1
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in SIGNALS}
    _requested.clear()
    _installed[0] = 1
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _installed[0] = 0
        _requested.clear()
