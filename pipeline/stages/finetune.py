"""Stage finetune: an Optuna study over how many top blocks to unfreeze and the learning rates.

Every trial starts from the trained head (LP-FT) and the pretrained blocks, and trains only the
top k blocks + head on the activations extract cached at their bottom — the frozen part of the
network never runs. Each trial is a nested MLflow run; the best trial becomes a self-describing
checkpoint of the whole model.

Trials are run by search.loop, which any number of processes (`finetune.workers`, `python -m
pipeline worker` on other machines) can run against one study: it stops when the study holds
`n_trials` finished (complete or pruned) trials, and a SIGKILLed worker's trial is failed by its
stale heartbeat and retried with the same parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from optuna.trial import TrialState

from pipeline import paths
from pipeline.data import holdout
from pipeline.devices import visible_gpus, worker_slots
from pipeline.model.checkpoints import save_checkpoint
from pipeline.params import Params
from pipeline.progress import say
from pipeline.search import study
from pipeline.search.loop import LOCAL_WORKERS_ENV, count, open_study, run_study, run_trials
from pipeline.search.outcome import assemble, checkpoint_config, record_outcome, select
from pipeline.search.trials import TrialRunner
from pipeline.tracking import lineage, logs, runs, store


def worker_main(params: Params, parent_run_id: str | None) -> None:
    """`python -m pipeline worker`: join the study of this project's data and params."""
    threads = os.environ.get("PIPELINE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    name = study.study_name(params, holdout.data_hash(), study.inputs_digest())
    worker = int(os.environ.get("PIPELINE_WORKER_ID") or os.getpid())  # spawned by finetune, or by hand
    if parent_run_id:  # spawned by finetune, which says how many processes share this machine
        store.setup(params.mlflow.experiment)
        sharing = os.environ.get(LOCAL_WORKERS_ENV)
        runner = TrialRunner(params, parent_run_id, int(sharing) if sharing else None)
        ran = run_trials(params, open_study(params, name), runner.run_trial, worker)
    else:  # a worker on another machine: its own parent run holds its trials
        with runs.stage_run("finetune-worker", params.mlflow.experiment, {},
                                tags={"optuna_study": name}) as mlrun:
            runner = TrialRunner(params, mlrun.info.run_id)
            ran = run_trials(params, open_study(params, name), runner.run_trial, worker)
    say(f"worker: ran {ran} trial(s) of study {name}")


def main(params: Params, workers: int | None = None, params_path: Path = paths.PARAMS) -> None:
    name = study.study_name(params, holdout.data_hash(), study.inputs_digest())
    logged = logs.flatten("finetune", vars(params.finetune))
    with runs.stage_run("finetune", params.mlflow.experiment, logged, tags={"optuna_study": name}) as mlrun:
        slots = worker_slots(workers or params.finetune.workers, visible_gpus())
        runner = TrialRunner(params, mlrun.info.run_id, local_workers=slots[0].sharing)
        s = open_study(params, name)
        run_study(params, s, runner.run_trial, slots, params_path, mlrun.info.run_id)
        ranked, members, decision = select(params, runner, s)
        save_checkpoint(paths.FINETUNED_DIR, assemble(runner, members).state_dict(),
                        checkpoint_config(runner, name, ranked[0], members))
        summary = record_outcome(s, ranked, members, decision)
        lineage.record_run("finetune", mlrun.info.run_id)
    say(
        f"finetune: study {name}: best trial {summary['best_trial']} (k={summary['best_k']}) val accuracy "
        f"{summary['best_val_accuracy']:.4f}; {summary['trials_complete']} complete, "
        f"{summary['trials_pruned']} pruned, {count(s, TrialState.FAIL)} failed/retried\n"
        f"finetune: chosen trial {summary['chosen_trial']} (k={summary['chosen_k']}), mean val accuracy "
        f"{summary['chosen_mean_val_accuracy']:.4f}; ships an ensemble of {len(members)} run(s) of "
        f"{summary['ensemble_configurations']} configuration(s) validation cannot tell apart\n"
        f"finetune: ships {decision.shipped} — {decision.reason}"
    )
