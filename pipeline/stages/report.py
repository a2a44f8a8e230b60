"""Stage report: the pipeline run — one MLflow run per pipeline run, carrying every param, the
headline metrics and reports/report.md with its images (pipeline/reporting), with this repro's
stage runs as its children (pipeline/tracking/pipeline_run.py)."""

from __future__ import annotations

import json

from pipeline import paths
from pipeline.atomic import write_text
from pipeline.data import holdout
from pipeline.params import Params
from pipeline.progress import say
from pipeline.reporting.markdown import build
from pipeline.tracking import lineage, logs, pipeline_run, runs


def main(params: Params) -> None:
    metrics = {stage: json.loads(paths.stage_metrics(stage).read_text())
               for stage in ("evaluate", "finetune", "train_head", "audit")}
    calibration = json.loads(paths.CALIBRATION.read_text())
    decision = json.loads(paths.DECISION.read_text())
    stage_runs = {stage: lineage.recorded_run(stage) for stage in pipeline_run.STAGES}
    tags = pipeline_run.context_tags(decision, holdout.data_hash(), stage_runs)
    with runs.stage_run("pipeline", params.mlflow.experiment, pipeline_run.flat_params(params), tags,
                        run_name=pipeline_run.run_name(runs.git_commit())) as mlrun:
        for stale in paths.REPORT_DIR.glob("*.png"):  # only this run's images
            stale.unlink()
        write_text(paths.REPORT, build(params, mlrun.info.run_id))
        logs.log_metrics({**pipeline_run.headline_metrics(metrics["evaluate"], metrics["finetune"],
                                                          metrics["train_head"], decision),
                          **pipeline_run.data_and_calibration_metrics(metrics["audit"], calibration),
                          **pipeline_run.stage_seconds(stage_runs)})
        logs.log_artifacts(str(paths.REPORT_DIR), "report")
        adopted = pipeline_run.adopt_stage_runs(mlrun.info.experiment_id, mlrun.info.run_id)
        pipeline_run.link_version(decision, mlrun.info.run_id)
    say(f"report: wrote {paths.REPORT}; pipeline run {mlrun.info.run_id} holds every param, the headline "
        f"metrics and the report, with {adopted} stage run(s) of this repro beneath it")
