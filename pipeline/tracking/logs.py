"""Params, metrics, tags and artifacts of a run, written in batches (one store write per
batch, not one per value)."""

from __future__ import annotations

import time

from pipeline.tracking.store import client, timed


@timed
def log_params(params: dict) -> None:
    """Log a flat dict of params in batches."""
    import mlflow

    _log_batch(mlflow.active_run().info.run_id, params=params)


def as_metrics(metrics: dict[str, float], step: int = 0) -> list:
    """MLflow Metric entities stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


@timed
def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None):
    import mlflow

    _log_batch(run_id or mlflow.active_run().info.run_id, metrics=as_metrics(metrics, step or 0))


@timed
def set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags(tags)


@timed
def log_dict(data: dict, name: str) -> None:
    import mlflow

    mlflow.log_dict(data, name)


@timed
def log_artifact(path: str) -> None:
    import mlflow

    mlflow.log_artifact(path)


@timed
def log_artifacts(folder: str, artifact_path: str | None = None) -> None:
    """Every file of a folder, at the run's artifact root (or under artifact_path)."""
    import mlflow

    mlflow.log_artifacts(folder, artifact_path)


@timed
def download_artifact(run_id: str, artifact_path: str, dst_path: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst_path)


CURVES = ("train_loss", "val_loss", "val_accuracy")


def curve_metrics(history) -> list:
    """Per-epoch curves as MLflow metrics, one step per epoch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, float(getattr(r, name)), now, r.epoch) for r in history for name in CURVES]


@timed
def log_curve(history, run_id: str | None = None) -> None:
    """Per-epoch curves as steps, all in one batched call."""
    import mlflow

    _log_batch(run_id or mlflow.active_run().info.run_id, metrics=curve_metrics(history))


class RunLog:
    """Params, metrics and tags of one run, held back and written together in one batch when
    `every` seconds have passed since the last write, and on flush(). A trial of second-long
    epochs then costs one store write instead of one per epoch; a slow trial's curves still
    reach the UI as it trains."""

    def __init__(self, run_id: str, every: float = 10.0):
        self.run_id, self.every = run_id, every
        self.params: dict = {}
        self.metrics: list = []
        self.tags: dict = {}
        self.last_write = time.monotonic()

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.metrics += as_metrics(metrics, step)

    def log_curve(self, history) -> None:
        self.metrics += curve_metrics(history)
        if time.monotonic() - self.last_write >= self.every:
            self.flush()

    @timed
    def flush(self) -> None:
        if self.params or self.metrics or self.tags:
            _log_batch(self.run_id, self.metrics, self.params, self.tags)
        self.params, self.metrics, self.tags = {}, [], {}
        self.last_write = time.monotonic()


def _log_batch(run_id: str, metrics=(), params: dict | None = None, tags: dict | None = None) -> None:
    """One log_batch call; MLflow's client splits it into batches within the store's limits
    (1000 entries, 100 params and tags per request)."""
    from mlflow.entities import Param, RunTag

    client().log_batch(run_id, metrics=list(metrics),
                       params=[Param(k, str(v)) for k, v in sorted((params or {}).items())],
                       tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()], synchronous=True)


def flatten(prefix: str, data: dict) -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = value
    return out
