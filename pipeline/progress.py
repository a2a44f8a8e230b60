"""Progress bars with rate and ETA; silenced by PIPELINE_QUIET=1 (or CI=true) for logs."""

from __future__ import annotations

import contextlib
import os
import time

from tqdm.auto import tqdm

# a file to which each bar appends `<unix time> start|end <stage>-loop`: lets a monitor (the GPU
# utilisation of .ci/gpu-check) count the samples of a stage's work loop alone, not its start-up
MARKS_ENV = "PIPELINE_MARKS"


def quiet() -> bool:
    return os.environ.get("PIPELINE_QUIET", "") not in ("", "0") or os.environ.get("CI") == "true"


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str = "img"):
    """A progress bar around a stage's work loop (which it marks, when MARKS_ENV names a file)."""
    name = f"{desc.split()[0]}-loop"
    with tqdm(total=total, desc=desc, unit=unit, disable=quiet(), dynamic_ncols=True) as progress:
        mark("start", name)
        yield progress
        mark("end", name)  # not after a failure: an unfinished loop has no window


def mark(kind: str, name: str) -> None:
    marks = os.environ.get(MARKS_ENV)
    if marks:
        with open(marks, "a") as out:
            out.write(f"{time.time():.3f} {kind} {name}\n")


def say(message: str) -> None:
    """Stage output a person reads (summaries); not silenced: they are the point of a run."""
    print(message, flush=True)
