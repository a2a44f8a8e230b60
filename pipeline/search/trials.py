"""One trial: fresh copies of the top k pretrained blocks and the trained head (LP-FT), trained on
the cached activations under its own nested MLflow run; also re-scoring runs with new seeds."""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from safetensors.torch import load_file, save_file

from pipeline import paths
from pipeline.devices import device_name, seed_everything, select_runtime
from pipeline.model import features
from pipeline.model.backbones import build_backbone
from pipeline.model.bn_folding import folded_copy
from pipeline.model.checkpoints import load_head
from pipeline.model.engine import EpochResult, ResidentInputs, predict_logits, train
from pipeline.model.freezing import freeze_all_but_top, param_groups
from pipeline.model.heads import TopModel
from pipeline.params import Params
from pipeline.progress import say
from pipeline.search import study
from pipeline.tracking import logs, runs
from pipeline.tracking.store import without_retries

TRIAL_WEIGHTS = "trial_weights.safetensors"


class TrialRunner:
    """Holds what every trial shares: pristine blocks, the trained head, cached inputs."""

    def __init__(self, params: Params, parent_run_id: str, local_workers: int | None = None):
        """local_workers: the processes on this machine sharing its device (finetune's --workers,
        which it passes on to the helpers it spawns); default finetune.workers."""
        self.params = params
        self.local_workers = local_workers or params.finetune.workers
        self.meta = features.read_meta()
        self.runtime = select_runtime(params.finetune.precision, training=True)
        self.backbone = build_backbone(self.meta["backbone"], self.meta["backbone_weights"])
        self.head, _ = load_head(paths.HEAD_DIR)
        self.parent_run_id = parent_run_id
        # the no-cache fallback runs the frozen prefix live, as extract does: inference
        # precision, BatchNorm folded (a copy: trials train the unfolded top blocks)
        self.live_runtime = select_runtime(params.extract.precision)
        self.frozen = None
        # each k's cached inputs, on the device for the trials of that k; workers share the memory
        self.resident = ResidentInputs(self.runtime, self.local_workers)
        if not params.finetune.cache:
            frozen = folded_copy(self.backbone).to(self.live_runtime.device)
            self.frozen = frozen.to(memory_format=torch.channels_last)

    def sources(self, k: int, seed: int):
        """(train, val) inputs for a trial unfreezing k blocks: cached activations, or live."""
        if self.params.finetune.cache:
            return self.resident.get(k, lambda k: (features.source("train", k), features.source("val", k)))
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
        child = runs.start_child_run(
            f"trial-{trial.number}", self.parent_run_id,
            tags={"stage": "finetune-trial", "optuna_study": trial.study.study_name,
                  "optuna_trial": str(trial.number), "trial_slot": str(slot),
                  "device": device_name(self.runtime.device), **runs.process_tags()},
        )
        trial.set_user_attr("mlflow_run_id", child.info.run_id)
        log = logs.RunLog(child.info.run_id)  # params, curves, outcome: written in one batch
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
            # stopping: one try, and a failure here leaves the stage run's end to close this run
            with without_retries(), contextlib.suppress(Exception):
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
    def _end(log: logs.RunLog, status: str) -> None:
        try:
            log.flush()  # what the trial logged, also when it was pruned, failed or killed
        finally:
            runs.end_run(status)

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

    def _train(self, trial: optuna.Trial, cfg: study.TrialConfig, slot: int, log: logs.RunLog) -> float:
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
        child = runs.start_child_run(
            f"rescore-{slot}-{repeat}", self.parent_run_id,
            tags={"stage": "finetune-rescore", "trial_slot": str(slot), "repeat": str(repeat),
                  **runs.process_tags()},
        )
        log = logs.RunLog(child.info.run_id)
        log.log_params({**vars(cfg), "seed": seed})
        status = "FAILED"
        try:
            model, _ = self.fit(cfg, seed, lambda result: log.log_curve([result]) or False)
            trained = TrainedRun(cfg.k, host_state(model), self.val_probabilities(model, cfg.k),
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
        logs.log_artifact(str(path))


def host_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in host memory: the candidates of a selection wait there, not on the GPU."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def trial_run(runner: TrialRunner, trial: optuna.trial.FrozenTrial, slot: int) -> TrainedRun:
    """A COMPLETE trial's own weights (from its MLflow run, any worker's) and validation results."""
    k = trial.params["k"]
    model = runner.model_for(k)
    with tempfile.TemporaryDirectory() as tmp:
        local = logs.download_artifact(trial.user_attrs["mlflow_run_id"], TRIAL_WEIGHTS, tmp)
        model.load_state_dict(load_file(local))
    return TrainedRun(k, host_state(model), runner.val_probabilities(model, k), runner.val_labels(),
                      trial.user_attrs["mlflow_run_id"], runner.params.seed + slot, slot)
