"""Stage report: reports/report.md with its images (pipeline/reporting), and the same folder
logged to the evaluate run in MLflow."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from pipeline import paths
from pipeline.atomic import write_text
from pipeline.params import Params
from pipeline.progress import say
from pipeline.reporting.markdown import build
from pipeline.tracking import store


def main(params: Params) -> None:
    store.setup(params.mlflow.experiment)
    if paths.REPORT_DIR.exists():  # only this run's images
        for stale in paths.REPORT_DIR.glob("*.png"):
            stale.unlink()
    markdown, evaluate_run = build(params)
    write_text(paths.REPORT, markdown)
    try:
        if evaluate_run:
            store.client().log_artifacts(evaluate_run, str(paths.REPORT_DIR), "report")
    except MlflowException:  # the evaluate run lives in another store (outputs pulled from a remote)
        evaluate_run = None
    say(f"report: wrote {paths.REPORT}" + (f" and logged it to MLflow run {evaluate_run}" if evaluate_run else ""))
