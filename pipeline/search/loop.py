"""The one ask/tell loop: any number of processes run trials of one study until it holds
`finetune.n_trials` finished ones, each trial through an `objective(trial, slot)`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import interrupts
from pipeline.cores import usable_cores
from pipeline.devices import WorkerSlot
from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.search import storage, study
from pipeline.tracking import store


def open_study(params: Params, name: str) -> optuna.Study:
    with store.store_lock():  # many workers may start on a new SQLite file at once
        return optuna.create_study(
            study_name=name, storage=storage.make_storage(), direction="maximize", load_if_exists=True,
            sampler=study.make_sampler(params), pruner=study.make_pruner(params),
        )


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards finetune.n_trials


def count(s: optuna.Study, *states: TrialState) -> int:
    return len(s.get_trials(deepcopy=False, states=states))


# objective(trial, slot) -> value: trains one trial, seeded by its slot (study.logical_number);
# raises optuna.TrialPruned when the pruner stops it
Objective = Callable[[optuna.Trial, int], float]


def run_trials(params: Params, s: optuna.Study, objective: Objective, worker: int = 0) -> int:
    """Run trials until the study holds n_trials finished (COMPLETE or PRUNED) ones, as Optuna's
    own `optimize(n_trials=...)` counts them; returns how many this ran.

    worker: 0 for the finetune stage itself, another number for each parallel worker, so that
    workers asking at the same moment do not draw the same parameters.
    Failed trials do not count (a killed one is retried). A pruned one does: the pruner exists to
    save its cost, not to buy a replacement. A slot is claimed by asking for a trial and then
    checking that it is among the first n finished-or-running ones, so workers that start
    together never overshoot n.
    """
    n = params.finetune.n_trials
    deadline = time.monotonic() + params.finetune.timeout_minutes * 60 if params.finetune.timeout_minutes else None
    ran, attempts = 0, 0
    while True:
        interrupts.check()  # a safe point: between trials
        storage.fail_stale_trials(s)
        finished = count(s, *FINISHED)
        if finished >= n or (deadline and time.monotonic() > deadline):
            return ran
        if finished + count(s, TrialState.RUNNING) >= n:
            time.sleep(1.0)  # the last slots are in flight elsewhere; they may still fail
            continue
        attempts += 1
        if attempts > 10 * n:
            raise PipelineError(
                f"finetune: {attempts - 1} trials started but the study still lacks {n - finished} finished "
                "ones (all failed?) — check the trial runs in MLflow"
            )
        s.sampler = study.make_sampler(params, study.next_slot(s), worker)
        with warnings.catch_warnings():  # our loop records the heartbeats that optimize() would
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = s.ask()
        storage.claim(trial)
        in_flight = sorted(t.number for t in s.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
        if trial.number not in in_flight[:n]:  # another worker took the last slot this instant
            trial.set_user_attr("surplus", True)
            s.tell(trial, state=TrialState.FAIL)
            continue
        ran += run_one(s, trial, objective)


def run_one(s: optuna.Study, trial: optuna.Trial, objective: Objective) -> int:
    """Run the objective and tell the study how it ended; 1 if the trial completed."""
    with storage.heartbeat(s, trial):
        try:
            value = objective(trial, study.logical_number(s, trial.number))
        except optuna.TrialPruned:
            s.tell(trial, state=TrialState.PRUNED)
            return 0
        except KeyboardInterrupt:  # ^C, or SIGTERM (errors.Terminated), at a safe point of the trial
            fail_and_retry(s, trial)
            raise
        except Exception:
            s.tell(trial, state=TrialState.FAIL)
            raise
    s.tell(trial, value)
    return 1


def fail_and_retry(s: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted trial still RUNNING: FAIL, and retried like a killed one — its slot is
    refilled, so a resumed study stays identical."""
    frozen = s.get_trials(deepcopy=False)[trial.number]
    if frozen.state == TrialState.RUNNING:
        s.tell(trial, state=TrialState.FAIL)
        storage.close_and_retry(s, frozen)


# how many processes on this machine share its device, as finetune tells the helpers it spawns
LOCAL_WORKERS_ENV = "PIPELINE_LOCAL_WORKERS"


def helper_env(slots: list[WorkerSlot], index: int) -> dict:
    """The environment of helper `index` (1, 2, ...; 0 is finetune itself) among the local
    processes `slots` describes: a share of the CPU threads, its GPU where the machine has several,
    and through LOCAL_WORKERS_ENV how many processes share its device's memory for resident inputs."""
    slot = slots[index]
    threads = max(1, usable_cores() // len(slots))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PIPELINE_TORCH_THREADS": str(threads),
           LOCAL_WORKERS_ENV: str(slot.sharing), "PIPELINE_WORKER_ID": str(index)}
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return env


def spawn_workers(slots: list[WorkerSlot], params_path: Path, parent_run_id: str) -> list[subprocess.Popen]:
    """The helper processes of `slots` (all but this one), on the same study."""
    command = [sys.executable, "-m", "pipeline", "--params", str(params_path), "worker",
               "--parent-run-id", parent_run_id]
    return [subprocess.Popen(command, env=helper_env(slots, i)) for i in range(1, len(slots))]


def run_study(params: Params, s: optuna.Study, objective: Objective, slots: list[WorkerSlot], params_path: Path,
              parent_run_id: str) -> None:
    """This process and a local helper per further slot run trials until the study is complete."""
    helpers = spawn_workers(slots, params_path, parent_run_id)
    try:
        run_trials(params, s, objective)
        while any(p.poll() is None for p in helpers):
            interrupts.check()  # a safe point while the helpers finish their last trials
            time.sleep(0.5)
    finally:
        for p in helpers:
            if p.poll() is None:  # stopping: the helpers stop at their next safe point too
                p.terminate()
        codes = [p.wait() for p in helpers]
    if any(codes):
        raise PipelineError(f"finetune: {sum(c != 0 for c in codes)} worker process(es) failed — see above")
