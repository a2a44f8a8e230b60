"""Creating MLflow objects through a tracking server that fails mid-request, without making two.

Since 3.18, MLflow does not resend a create (experiment, run, logged model, model version) that a
server answered with a 5xx: the server may have made it before failing, and a blind resend would
make two. MLflow still retries reads, idempotent writes and connection errors. A stage that
worked for minutes and logs at its end must not be lost to a restarting server (a load balancer
answers 503 meanwhile), so the pipeline resends its creates itself, each time after first looking
for what the failed request may have made. Only answers are resent: a request whose answer was
lost (a read timeout, a 504 from a gateway) may still be running on the server, where looking
first cannot rule out a second copy, and a connection MLflow could not open even with its own
retries means a server that is down. Only against a tracking server: a local store's error is
not transient.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline import interrupts

T = TypeVar("T")

BACKOFF_MAX_SECONDS = 120  # urllib3's cap, which MLflow's own retries also use


def failed_answer(exc: BaseException) -> bool:
    """The server (or a proxy before it) answered 500, 502 or 503: the request is over, made or
    not. MLflow raises those without an underlying error; a connection or read error it wraps,
    also reported as 500, carries the requests error that caused it."""
    import requests
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or exc.get_http_status_code() not in (500, 503):  # 502 maps to 500
        return False
    return not isinstance(exc.__cause__ or exc.__context__, requests.exceptions.RequestException)


def resends_itself() -> bool:
    """MLflow before 3.18 resends every create on a 5xx itself (blindly); adding ours would double
    the wait for a server that is down."""
    import mlflow

    return tuple(int(part) for part in mlflow.__version__.split(".")[:2]) < (3, 18)


def to_server() -> bool:
    return os.environ.get("MLFLOW_TRACKING_URI", "").lower().startswith(("http://", "https://"))


def create_once(create: Callable[[], T], find: Callable[[], T | None] | None = None) -> T:
    """create(), resent after each failed answer (failed_answer), until it succeeds or find()
    returns what an earlier try made (no find: a create that takes what it already made, or
    whose spare copy does no harm). As many tries as MLflow's own retries, with a
    back-off like theirs (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _BACKOFF_JITTER):
    none where the caller turned them off (store.without_retries)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() if to_server() and not resends_itself() else 0
    attempt = 0
    while True:
        try:
            return create()
        except Exception as exc:
            if attempt >= retries or not failed_answer(exc):
                raise
        backoff = min(BACKOFF_MAX_SECONDS, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() * 2**attempt)
        time.sleep(backoff + random.uniform(0, MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()))
        interrupts.check()  # SIGTERM or ^C during the wait: stop now, not after the back-off
        attempt += 1
        made = find() if find else None  # a read: MLflow's own retries cover it
        if made is not None:
            return made
