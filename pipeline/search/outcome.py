"""After the study: re-score its top configurations, choose what ships, assemble the model, and
record the outcome (DVC metrics and plots, the selection record, the finetune MLflow run)."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import paths
from pipeline.atomic import write_json
from pipeline.model.checkpoints import model_config
from pipeline.model.heads import EnsembleClassifier
from pipeline.params import Params
from pipeline.search import selection, study
from pipeline.search.loop import FINISHED, count
from pipeline.search.plots import log_study_plots
from pipeline.search.trials import TrainedRun, TrialRunner, trial_run
from pipeline.tracking import logs


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
    head_correct = runner.val_probabilities(runner.model_for(0), 0).argmax(1) == labels  # on the device
    decision = selection.decide_shipping(ensemble_correct, head_correct, f.ship_significance)
    return ranked, members, decision


def assemble(runner: TrialRunner, members: list[TrainedRun]) -> EnsembleClassifier:
    """The full model: the pretrained backbone's frozen bottom feeding every member's top k
    blocks and head (the same k: one configuration, several seeds)."""
    tops = []
    for run in members:
        top = runner.model_for(run.k).cpu()
        top.load_state_dict(run.state)
        tops.append(top)
    return EnsembleClassifier(copy.deepcopy(runner.backbone), tops).eval()


def checkpoint_config(runner: TrialRunner, name: str, chosen: selection.Candidate,
                      members: list[TrainedRun]) -> dict:
    return model_config(
        runner.meta, members[0].k, runner.head.dropout.p, runner.params.data.max_image_pixels, head_only=False,
        trial=chosen.slot,
        study=name,
        trial_run_id=members[0].run_id,  # the trial's own run; the others are tagged on finetune's
        hyperparameters=chosen.params,
        members=[{"trial": r.trial, "seed": r.seed, "val_accuracy": r.val_accuracy} for r in members],
    )


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
    logs.log_params({f"best.{k}": v for k, v in best.params.items()})
    logs.log_metrics({**summary, "trials_failed": count(s, TrialState.FAIL)})
    logs.set_tags({"best_trial_run_id": best.user_attrs["mlflow_run_id"], "shipped": decision.shipped,
                       "member_run_ids": ",".join(r.run_id for r in members)})
    logs.log_dict(record, "selection.json")
    log_study_plots(s)
    write_json(paths.stage_metrics("finetune"), summary)
    write_json(paths.SELECTION, record)
    write_json(paths.PLOTS_DIR / "finetune_trials.json", [
        {"trial": slot, "state": t.state.name, "value": t.value, **t.params} for slot, t in finished
    ])
    return summary
