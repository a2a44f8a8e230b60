"""Progress bars with rate and ETA; silenced by PIPELINE_QUIET=1 (or CI=true) for logs."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("PIPELINE_QUIET", "") not in ("", "0") or os.environ.get("CI") == "true"


def bar(total: int, desc: str, unit: str = "img"):
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet(), dynamic_ncols=True)


def say(message: str) -> None:
    """Stage output a person reads (summaries); not silenced: they are the point of a run."""
    print(message, flush=True)
