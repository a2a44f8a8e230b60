"""Stage finetune: an Optuna study over how many top blocks to unfreeze and the learning rates.

Every trial starts from the trained head (LP-FT) and the pretrained blocks, and trains only the
top k blocks + head on the activations extract cached at their bottom — the frozen part of the
network never runs. Each trial is a nested MLflow run; the best trial becomes a self-describing
checkpoint of the whole model.
"""

from __future__ import annotations

import copy
import json

import mlflow
import optuna
import torch
from safetensors.torch import load_file, save_file

from pipeline import features, paths, study, tracking
from pipeline.atomic import atomic_path, write_json
from pipeline.backbones import build_backbone
from pipeline.checkpoints import read_config, read_weights, save_checkpoint
from pipeline.devices import seed_everything, select_runtime
from pipeline.engine import Classifier, EpochResult, TopModel, train
from pipeline.freezing import freeze_all_but_top, param_groups
from pipeline.heads import Head
from pipeline.params import Params
from pipeline.progress import say


class TrialRunner:
    """Holds what every trial shares: pristine blocks, the trained head, cached inputs."""

    def __init__(self, params: Params, study_name: str, parent_run_id: str):
        self.params = params
        self.meta = features.read_meta()
        self.runtime = select_runtime(params.finetune.precision, training=True)
        self.backbone = build_backbone(self.meta["backbone"], self.meta["backbone_weights"])
        head_config = read_config(paths.HEAD_DIR)
        self.head = Head(head_config["num_features"], len(head_config["classes"]),
                         head_config["dropout"])
        self.head.load_state_dict(read_weights(paths.HEAD_DIR))
        self.trials_dir = paths.mlruns_dir() / "trials" / study_name
        self.parent_run_id = parent_run_id

    def model_for(self, k: int) -> TopModel:
        """Fresh copies of the top k pretrained blocks and the trained head (LP-FT)."""
        top = TopModel.top_of(self.backbone, self.head, k)
        return copy.deepcopy(top).to(self.runtime.device).to(memory_format=torch.channels_last)

    def weights_path(self, number: int):
        return self.trials_dir / f"trial-{number:04d}.safetensors"

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.params
        cfg = study.suggest(trial, params)
        seed = params.seed + trial.number
        seed_everything(seed)
        model = self.model_for(cfg.k)
        freeze_all_but_top(model.blocks, cfg.k, params.finetune.bn_train)
        groups = param_groups(model.blocks, model.head, cfg.k, cfg.head_lr, cfg.backbone_lr,
                              cfg.layer_decay, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups)

        def set_train_mode() -> None:
            model.head.train()
            freeze_all_but_top(model.blocks, cfg.k, params.finetune.bn_train)

        child = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True)
        try:
            best = self._train_logged(trial, cfg, model, optimizer, set_train_mode, seed, child)
        except optuna.TrialPruned:
            mlflow.set_tag("optuna_state", "PRUNED")
            mlflow.end_run("KILLED")
            raise
        except (tracking.Terminated, KeyboardInterrupt):
            mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            mlflow.set_tags({"optuna_state": "FAIL", "error": repr(exc)[:1000]})
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")
        return best.val_accuracy


    def _train_logged(self, trial, cfg, model, optimizer, set_train_mode, seed, child):
        params = self.params
        mlflow.set_tags({"optuna_study": trial.study.study_name,
                         "optuna_trial": str(trial.number), "stage": "finetune-trial"})
        tracking.log_params({**vars(cfg), "trial_number": trial.number})
        trial.set_user_attr("mlflow_run_id", child.info.run_id)

        def on_epoch(result: EpochResult) -> bool:
            tracking.log_curve([result])
            trial.report(result.val_accuracy, result.epoch)
            if trial.should_prune():
                mlflow.set_tag("pruned_at_epoch", str(result.epoch))
                raise optuna.TrialPruned(f"pruned at epoch {result.epoch}")
            return False

        best_state, history = train(
            model, optimizer, features.source("train", cfg.k), features.source("val", cfg.k),
            epochs=params.finetune.epochs, batch_size=params.finetune.batch_size,
            runtime=self.runtime, seed=seed, label_smoothing=params.finetune.label_smoothing,
            set_train_mode=set_train_mode, on_epoch=on_epoch,
        )
        best = max(history, key=lambda r: (r.val_accuracy, -r.val_loss))
        with atomic_path(self.weights_path(trial.number)) as tmp:
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp))
        tracking.log_metrics({"best_val_accuracy": best.val_accuracy,
                              "best_val_loss": best.val_loss})
        mlflow.set_tag("optuna_state", "COMPLETE")
        trial.set_user_attr("best_epoch", best.epoch)
        trial.set_user_attr("best_val_loss", best.val_loss)
        return best


def run_study(params: Params, runner: TrialRunner, name: str) -> optuna.Study:
    storage = study.make_storage()
    s = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=study.make_sampler(params), pruner=study.make_pruner(params),
    )
    n = params.finetune.n_trials
    complete = (optuna.trial.TrialState.COMPLETE,)
    done = len(s.get_trials(deepcopy=False, states=complete))
    if done < n:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        timeout = params.finetune.timeout_minutes * 60 or None
        # pruned trials do not count towards n; the cap only stops a study that prunes forever
        s.optimize(
            runner, n_trials=None if timeout else 10 * n, timeout=timeout,
            callbacks=[optuna.study.MaxTrialsCallback(n, states=complete)],
            catch=(), gc_after_trial=True,
        )
    return s


def assemble_best(runner: TrialRunner, best: optuna.trial.FrozenTrial) -> Classifier:
    """The full model: pretrained backbone with the best trial's top k blocks and head."""
    k = best.params["k"]
    top = runner.model_for(k).cpu()
    top.load_state_dict(load_file(str(runner.weights_path(best.number))))
    backbone = copy.deepcopy(runner.backbone)
    n = len(backbone.blocks)
    for j, block in enumerate(top.blocks):
        backbone.blocks[n - k + j] = block
    return Classifier(backbone, top.head).eval()


def main(params: Params) -> None:
    data_hash = json.loads(paths.CLASSES.read_text())["data_hash"]
    name = study.study_name(params, data_hash)
    logged = tracking.flatten("finetune", vars(params.finetune))
    with tracking.stage_run("finetune", params.mlflow.experiment, logged,
                            tags={"optuna_study": name}) as mlrun:
        runner = TrialRunner(params, name, mlrun.info.run_id)
        s = run_study(params, runner, name)
        best = s.best_trial
        model = assemble_best(runner, best)
        meta = runner.meta
        config = {
            "head_only": False,
            "backbone": meta["backbone"],
            "backbone_weights": meta["backbone_weights"],
            "num_features": meta["num_features"],
            "dropout": runner.head.dropout.p,
            "classes": meta["classes"],
            "image_size": meta["image_size"],
            "input_config": meta["input_config"],
            "k": best.params["k"],
            "trial": best.number,
            "study": name,
            "hyperparameters": best.params,
        }
        save_checkpoint(paths.FINETUNED_DIR, model.state_dict(), config)
        states = [t.state for t in s.trials]
        summary = {
            "best_val_accuracy": best.value,
            "best_k": best.params["k"],
            "best_trial": best.number,
            "trials_complete": states.count(optuna.trial.TrialState.COMPLETE),
            "trials_pruned": states.count(optuna.trial.TrialState.PRUNED),
            "trials_failed": states.count(optuna.trial.TrialState.FAIL),
        }
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracking.log_metrics({"best_val_accuracy": best.value, "best_k": best.params["k"],
                              "trials_complete": summary["trials_complete"],
                              "trials_pruned": summary["trials_pruned"]})
        write_json(paths.stage_metrics("finetune"), summary)
        write_json(paths.PLOTS_DIR / "finetune_trials.json", [
            {"trial": t.number, "state": t.state.name, "value": t.value, **t.params}
            for t in s.trials
        ])
        tracking.record_run("finetune", mlrun.info.run_id)
    say(
        f"finetune: study {name}: best trial {best.number} (k={best.params['k']}) val accuracy "
        f"{best.value:.4f}; {summary['trials_complete']} complete, "
        f"{summary['trials_pruned']} pruned"
    )
