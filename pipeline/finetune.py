"""Stage finetune: an Optuna study over how many top blocks to unfreeze and the learning rates.

Every trial starts from the trained head (LP-FT) and the pretrained blocks, and trains only the
top k blocks + head on the activations extract cached at their bottom — the frozen part of the
network never runs. Each trial is a nested MLflow run; the best trial becomes a self-describing
checkpoint of the whole model.

Trials are run by `work()`, which any number of processes (`finetune.workers`, `python -m
pipeline worker` on other machines) can run against one study: it stops when the study holds
`n_trials` finished (complete or pruned) trials, and a SIGKILLed worker's trial is failed by its stale heartbeat and
retried with the same parameters.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

from pipeline import features, holdout, interrupts, paths, selection, study, tracking
from pipeline.atomic import write_json
from pipeline.backbones import build_backbone
from pipeline.bn_folding import folded_copy
from pipeline.checkpoints import load_head, save_checkpoint
from pipeline.devices import seed_everything, select_runtime
from pipeline.engine import EnsembleClassifier, EpochResult, TopModel, predict_logits, train
from pipeline.errors import PipelineError
from pipeline.freezing import freeze_all_but_top, param_groups
from pipeline.params import Params
from pipeline.progress import say
from pipeline.trial_plots import log_study_plots

TRIAL_WEIGHTS = "trial_weights.safetensors"


class TrialRunner:
    """Holds what every trial shares: pristine blocks, the trained head, cached inputs."""

    def __init__(self, params: Params, parent_run_id: str):
        self.params = params
        self.meta = features.read_meta()
        self.runtime = select_runtime(params.finetune.precision, training=True)
        self.backbone = build_backbone(self.meta["backbone"], self.meta["backbone_weights"])
        self.head, _ = load_head(paths.HEAD_DIR)
        self.parent_run_id = parent_run_id
        # the no-cache fallback runs the frozen prefix live, as extract does: inference
        # precision, BatchNorm folded (a copy: trials train the unfolded top blocks)
        self.live_runtime = select_runtime(params.extract.precision)
        self.frozen = None
        if not params.finetune.cache:
            frozen = folded_copy(self.backbone).to(self.live_runtime.device)
            self.frozen = frozen.to(memory_format=torch.channels_last)

    def sources(self, k: int, seed: int):
        """(train, val) inputs for a trial unfreezing k blocks: cached activations, or live."""
        if self.params.finetune.cache:
            return features.source("train", k), features.source("val", k)
        return (features.LiveSource("train", k, self.frozen, self.live_runtime, True, seed),
                features.LiveSource("val", k, self.frozen, self.live_runtime, False, seed))

    def model_for(self, k: int) -> TopModel:
        """Fresh copies of the top k pretrained blocks and the trained head (LP-FT)."""
        top = TopModel.top_of(self.backbone, self.head, k)
        return copy.deepcopy(top).cpu().to(self.runtime.device).to(memory_format=torch.channels_last)

    def run_trial(self, trial: optuna.Trial, slot: int | None = None) -> float:
        """Train one trial inside its own MLflow child run; raises TrialPruned when pruned.

        slot: the trial's logical number (study.logical_number), which seeds it; default its number.
        """
        slot = trial.number if slot is None else slot
        cfg = study.suggest(trial, self.params)
        child = tracking.start_child_run(
            f"trial-{trial.number}", self.parent_run_id,
            tags={"stage": "finetune-trial", "optuna_study": trial.study.study_name,
                  "optuna_trial": str(trial.number), "trial_slot": str(slot), **tracking.process_tags()},
        )
        trial.set_user_attr("mlflow_run_id", child.info.run_id)
        log = tracking.RunLog(child.info.run_id)  # params, curves, outcome: written in one batch
        log.log_params({**vars(cfg), "trial_number": trial.number})
        start = time.perf_counter()
        try:
            value = self._train(trial, cfg, slot, log)
        except optuna.TrialPruned as pruned:
            log.set_tags({"optuna_state": "PRUNED"})
            self._end(log, "KILLED")
            say(f"finetune: trial {slot} (k={cfg.k}) {pruned} ({time.perf_counter() - start:.1f} s)")
            raise
        except KeyboardInterrupt:  # ^C, or SIGTERM (errors.Terminated)
            self._end(log, "KILLED")
            raise
        except BaseException as exc:
            log.set_tags({"optuna_state": "FAIL", "error": repr(exc)[:1000]})
            self._end(log, "FAILED")
            raise
        log.set_tags({"optuna_state": "COMPLETE"})
        self._end(log, "FINISHED")
        # one line per trial, TTY or not: a CI log shows the study moving
        say(f"finetune: trial {slot} (k={cfg.k}) val accuracy {value:.4f} ({time.perf_counter() - start:.1f} s)")
        return value

    @staticmethod
    def _end(log: tracking.RunLog, status: str) -> None:
        try:
            log.flush()  # what the trial logged, also when it was pruned, failed or killed
        finally:
            tracking.end_run(status)

    def fit(self, cfg: study.TrialConfig, seed: int, on_epoch=None) -> tuple[TopModel, list[EpochResult]]:
        """Train fresh top k blocks + head with cfg; the model comes back with its last-epoch
        weights — the ones its score describes (no best-of-epochs pick on the validation split)."""
        f = self.params.finetune
        seed_everything(seed)
        model = self.model_for(cfg.k)
        freeze_all_but_top(model.blocks, cfg.k, f.bn_train)
        groups = param_groups(model.blocks, model.head, cfg.k, cfg.head_lr, cfg.backbone_lr,
                              cfg.layer_decay, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups)

        def set_train_mode() -> None:
            model.head.train()
            freeze_all_but_top(model.blocks, cfg.k, f.bn_train)

        train_source, val_source = self.sources(cfg.k, seed)
        _, history = train(
            model, optimizer, train_source, val_source,
            epochs=f.epochs, batch_size=f.batch_size, runtime=self.runtime, seed=seed,
            label_smoothing=f.label_smoothing, set_train_mode=set_train_mode, on_epoch=on_epoch,
            compile_model=f.compile,
        )
        return model.eval(), history

    def val_probabilities(self, model: TopModel, k: int) -> np.ndarray:
        """(N_val, classes) softmax probabilities of a top model on the validation split."""
        source = self.sources(k, self.params.seed)[1]
        logits = predict_logits(model, source, self.params.finetune.batch_size * 2, self.runtime)
        return torch.softmax(logits, dim=1).numpy()

    def val_labels(self) -> np.ndarray:
        return features.labels("val")

    def _train(self, trial: optuna.Trial, cfg: study.TrialConfig, slot: int, log: tracking.RunLog) -> float:
        def on_epoch(result: EpochResult) -> bool:
            log.log_curve([result])
            trial.report(result.val_accuracy, result.epoch)
            if trial.should_prune():
                log.set_tags({"pruned_at_epoch": str(result.epoch)})
                raise optuna.TrialPruned(f"pruned at epoch {result.epoch}")
            return False

        model, history = self.fit(cfg, self.params.seed + slot, on_epoch)
        final = history[-1]
        # the trial's weights live with its MLflow run, so a worker on any machine can supply
        # the best trial; logged before the trial is told COMPLETE
        log_weights(model.state_dict())
        log.log_metrics({"val_accuracy": final.val_accuracy, "val_loss": final.val_loss})
        return final.val_accuracy

    def rescore(self, cfg: study.TrialConfig, slot: int, repeat: int) -> TrainedRun:
        """Train a candidate's configuration again with a fresh seed, in its own child run."""
        seed = self.params.seed + slot + RESCORE_SEED_STRIDE * repeat
        child = tracking.start_child_run(
            f"rescore-{slot}-{repeat}", self.parent_run_id,
            tags={"stage": "finetune-rescore", "trial_slot": str(slot), "repeat": str(repeat),
                  **tracking.process_tags()},
        )
        log = tracking.RunLog(child.info.run_id)
        log.log_params({**vars(cfg), "seed": seed})
        status = "FAILED"
        try:
            model, _ = self.fit(cfg, seed, lambda result: log.log_curve([result]) or False)
            trained = TrainedRun(cfg.k, model.state_dict(), self.val_probabilities(model, cfg.k),
                                 self.val_labels(), child.info.run_id, seed, slot)
            log.log_metrics({"val_accuracy": trained.val_accuracy})
            status = "FINISHED"
            say(f"finetune: re-score of trial {slot} (k={cfg.k}) with seed {seed}: "
                f"val accuracy {trained.val_accuracy:.4f}")
        except KeyboardInterrupt:  # ^C, or SIGTERM (errors.Terminated)
            status = "KILLED"
            raise
        finally:
            self._end(log, status)
        return trained


@dataclass
class TrainedRun:
    """A trained top model (k blocks + head) and what it predicts for each validation image."""

    k: int
    state: dict[str, torch.Tensor]
    val_probabilities: np.ndarray  # (N_val, classes)
    val_labels: np.ndarray
    run_id: str
    seed: int
    trial: int  # the study slot whose configuration it trained

    @property
    def val_accuracy(self) -> float:
        return float((self.val_probabilities.argmax(1) == self.val_labels).mean())


RESCORE_SEED_STRIDE = 1000  # re-scoring seeds stay clear of the study's seeds (seed + slot)


def log_weights(state: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRIAL_WEIGHTS
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        tracking.log_artifact(str(path))


def trial_run(runner: TrialRunner, trial: optuna.trial.FrozenTrial, slot: int) -> TrainedRun:
    """A COMPLETE trial's own weights (from its MLflow run, any worker's) and validation results."""
    k = trial.params["k"]
    model = runner.model_for(k)
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifact(trial.user_attrs["mlflow_run_id"], TRIAL_WEIGHTS, tmp)
        model.load_state_dict(load_file(local))
    return TrainedRun(k, model.state_dict(), runner.val_probabilities(model, k), runner.val_labels(),
                      trial.user_attrs["mlflow_run_id"], runner.params.seed + slot, slot)


def select(params: Params, runner: TrialRunner, s: optuna.Study):
    """Re-score the study's top configurations over fresh seeds, rank them by mean validation
    accuracy, ensemble every run of those validation cannot tell from the best, and decide on
    validation whether that ships instead of the head-only model.

    Returns (ranked candidates, the ensemble's runs, the shipping decision).
    """
    f = params.finetune
    candidates, runs = [], {}
    for trial in study.top_trials(s, f.rescore_top):
        slot = study.logical_number(s, trial.number)
        cfg = study.config_of(trial, params)
        trained = [trial_run(runner, trial, slot)]
        trained += [runner.rescore(cfg, slot, repeat) for repeat in range(1, f.rescore_seeds)]
        runs[slot] = trained
        candidates.append(selection.Candidate(slot, dict(trial.params), [r.val_accuracy for r in trained]))
    labels = runner.val_labels()
    ranked = selection.rank(candidates)
    ensembled = selection.indistinguishable_from_best(ranked, len(labels))
    members = [run for candidate in ensembled for run in runs[candidate.slot]]
    ensemble_correct = np.mean([r.val_probabilities for r in members], axis=0).argmax(1) == labels
    head_correct = runner.val_probabilities(TopModel(runner.head), 0).argmax(1) == labels
    decision = selection.decide_shipping(ensemble_correct, head_correct, f.ship_significance)
    return ranked, members, decision


def open_study(params: Params, name: str) -> optuna.Study:
    with tracking.store_lock():  # many workers may start on a new SQLite file at once
        return optuna.create_study(
            study_name=name, storage=study.make_storage(), direction="maximize", load_if_exists=True,
            sampler=study.make_sampler(params), pruner=study.make_pruner(params),
        )


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards finetune.n_trials


def count(s: optuna.Study, *states: TrialState) -> int:
    return len(s.get_trials(deepcopy=False, states=states))


def work(params: Params, runner: TrialRunner, s: optuna.Study, worker: int = 0) -> int:
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
        study.fail_stale_trials(s)
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
        trial = None
        try:
            # a SIGTERM during ask is held until the trial exists, so the handler below can fail it
            with warnings.catch_warnings(), interrupts.store_call():
                # our loop records the heartbeats that optimize() would
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = s.ask()
                study.claim(trial)
            in_flight = sorted(t.number for t in s.get_trials(deepcopy=False,
                                                              states=(*FINISHED, TrialState.RUNNING)))
            if trial.number not in in_flight[:n]:  # another worker took the last slot this instant
                trial.set_user_attr("surplus", True)
                s.tell(trial, state=TrialState.FAIL)
                continue
            with study.heartbeat(s, trial):
                try:
                    value = runner.run_trial(trial, study.logical_number(s, trial.number))
                except optuna.TrialPruned:
                    s.tell(trial, state=TrialState.PRUNED)
                except Exception:
                    s.tell(trial, state=TrialState.FAIL)
                    raise
                else:
                    s.tell(trial, value)
                    ran += 1
        except KeyboardInterrupt:  # ^C, or SIGTERM (errors.Terminated), at any point of the trial
            if trial is not None:
                fail_and_retry(s, trial)
            raise


def fail_and_retry(s: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted trial still RUNNING: FAIL, and retried like a killed one — its slot is
    refilled, so a resumed study stays identical. One already told (the signal came after) stays."""
    frozen = s.get_trials(deepcopy=False)[trial.number]
    if frozen.state == TrialState.RUNNING:
        s.tell(trial, state=TrialState.FAIL)
        study.close_and_retry(s, frozen)


def spawn_workers(extra: int, params_path: Path, parent_run_id: str) -> list[subprocess.Popen]:
    """Extra local worker processes on the same study, each with a share of the CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // (extra + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PIPELINE_TORCH_THREADS": str(threads)}
    command = [sys.executable, "-m", "pipeline", "--params", str(params_path), "worker",
               "--parent-run-id", parent_run_id]
    return [subprocess.Popen(command, env={**env, "PIPELINE_WORKER_ID": str(i)}) for i in range(1, extra + 1)]


def worker_main(params: Params, parent_run_id: str | None) -> None:
    """`python -m pipeline worker`: join the study of this project's data and params."""
    threads = os.environ.get("PIPELINE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    name = study.study_name(params, holdout.data_hash(), study.inputs_digest())
    worker = int(os.environ.get("PIPELINE_WORKER_ID") or os.getpid())  # spawned by finetune, or by hand
    if parent_run_id:
        tracking.setup(params.mlflow.experiment)
        runner = TrialRunner(params, parent_run_id)
        ran = work(params, runner, open_study(params, name), worker)
    else:  # a worker on another machine: its own parent run holds its trials
        with tracking.stage_run("finetune-worker", params.mlflow.experiment, {},
                                tags={"optuna_study": name}) as mlrun:
            runner = TrialRunner(params, mlrun.info.run_id)
            ran = work(params, runner, open_study(params, name), worker)
    say(f"worker: ran {ran} trial(s) of study {name}")


def assemble(runner: TrialRunner, members: list[TrainedRun]) -> EnsembleClassifier:
    """The full model: the pretrained backbone's frozen bottom feeding every member's top k
    blocks and head (the same k: one configuration, several seeds)."""
    tops = []
    for run in members:
        top = runner.model_for(run.k).cpu()
        top.load_state_dict(run.state)
        tops.append(top)
    return EnsembleClassifier(copy.deepcopy(runner.backbone), tops).eval()


def run_study(params: Params, runner: TrialRunner, s: optuna.Study, workers: int, params_path: Path) -> None:
    """This process and `workers - 1` local helpers run trials until the study is complete."""
    helpers = spawn_workers(workers - 1, params_path, runner.parent_run_id) if workers > 1 else []
    try:
        work(params, runner, s)
    finally:
        codes = [p.wait() for p in helpers]
    if any(codes):
        raise PipelineError(f"finetune: {sum(c != 0 for c in codes)} worker process(es) failed — see above")


def checkpoint_config(runner: TrialRunner, name: str, chosen: selection.Candidate,
                      members: list[TrainedRun]) -> dict:
    meta = runner.meta
    return {
        "head_only": False,
        "backbone": meta["backbone"],
        "backbone_weights": meta["backbone_weights"],
        "num_features": meta["num_features"],
        "dropout": runner.head.dropout.p,
        "classes": meta["classes"],
        "image_size": meta["image_size"],
        "input_config": meta["input_config"],
        "k": members[0].k,
        "trial": chosen.slot,
        "study": name,
        "trial_run_id": members[0].run_id,  # the trial's own run; the others are tagged on finetune's
        "hyperparameters": chosen.params,
        "members": [{"trial": r.trial, "seed": r.seed, "val_accuracy": r.val_accuracy} for r in members],
    }


def record_outcome(s: optuna.Study, ranked: list[selection.Candidate], members: list[TrainedRun],
                   decision: selection.ShipDecision) -> dict:
    """DVC metrics and plots, the selection record, and the same in the finetune MLflow run."""
    best = study.best_trial(s)
    # trials by slot: what an unbroken study holds. Killed attempts (FAIL, retried under a new
    # number) are counted in MLflow and the log line, not in DVC's metrics, which must come out
    # the same whether or not the study was interrupted.
    finished = sorted(((study.logical_number(s, t.number), t) for t in s.get_trials(deepcopy=False)
                       if t.state in FINISHED), key=lambda pair: pair[0])
    states = [t.state for _, t in finished]
    summary = {
        "best_val_accuracy": best.value,  # the study's best single trial
        "best_k": best.params["k"],
        "best_trial": study.logical_number(s, best.number),
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_pruned": states.count(TrialState.PRUNED),
        "chosen_trial": ranked[0].slot,  # the best configuration by mean over seeds
        "chosen_k": members[0].k,
        "chosen_mean_val_accuracy": ranked[0].mean_val_accuracy,
        "ensemble_size": len(members),
        "ensemble_configurations": len({r.trial for r in members}),
        "finetuned_val_accuracy": decision.finetuned_val_accuracy,
        "head_only_val_accuracy": decision.head_only_val_accuracy,
        "ship_p_value": decision.p_value,
        "ships_finetuned": int(decision.shipped == selection.FINETUNED),
    }
    # no run ids here: a DVC output must come out the same from two clean runs
    record = {**asdict(decision), "ensembled_trials": sorted({r.trial for r in members}),
              "candidates": [{"trial": c.slot, **c.params, "val_accuracies": c.val_accuracies,
                              "mean_val_accuracy": c.mean_val_accuracy} for c in ranked]}
    tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
    tracking.log_metrics({**summary, "trials_failed": count(s, TrialState.FAIL)})
    tracking.set_tags({"best_trial_run_id": best.user_attrs["mlflow_run_id"], "shipped": decision.shipped,
                       "member_run_ids": ",".join(r.run_id for r in members)})
    tracking.log_dict(record, "selection.json")
    log_study_plots(s)
    write_json(paths.stage_metrics("finetune"), summary)
    write_json(paths.SELECTION, record)
    write_json(paths.PLOTS_DIR / "finetune_trials.json", [
        {"trial": slot, "state": t.state.name, "value": t.value, **t.params} for slot, t in finished
    ])
    return summary


def main(params: Params, workers: int | None = None, params_path: Path = paths.PARAMS) -> None:
    name = study.study_name(params, holdout.data_hash(), study.inputs_digest())
    logged = tracking.flatten("finetune", vars(params.finetune))
    with tracking.stage_run("finetune", params.mlflow.experiment, logged, tags={"optuna_study": name}) as mlrun:
        runner = TrialRunner(params, mlrun.info.run_id)
        s = open_study(params, name)
        run_study(params, runner, s, workers or params.finetune.workers, params_path)
        ranked, members, decision = select(params, runner, s)
        save_checkpoint(paths.FINETUNED_DIR, assemble(runner, members).state_dict(),
                        checkpoint_config(runner, name, ranked[0], members))
        summary = record_outcome(s, ranked, members, decision)
        tracking.record_run("finetune", mlrun.info.run_id)
    say(
        f"finetune: study {name}: best trial {summary['best_trial']} (k={summary['best_k']}) val accuracy "
        f"{summary['best_val_accuracy']:.4f}; {summary['trials_complete']} complete, "
        f"{summary['trials_pruned']} pruned, {count(s, TrialState.FAIL)} failed/retried\n"
        f"finetune: chosen trial {summary['chosen_trial']} (k={summary['chosen_k']}), mean val accuracy "
        f"{summary['chosen_mean_val_accuracy']:.4f}; ships an ensemble of {len(members)} run(s) of "
        f"{summary['ensemble_configurations']} configuration(s) validation cannot tell apart\n"
        f"finetune: ships {decision.shipped} — {decision.reason}"
    )
