"""Stage train_head: the feature-extraction strategy — a linear head on frozen, cached features,
trained to convergence (early stopping on validation loss). Seconds, not minutes."""

from __future__ import annotations

import torch

from pipeline import paths
from pipeline.atomic import write_json
from pipeline.devices import Runtime, seed_everything
from pipeline.model import features
from pipeline.model.checkpoints import model_config, save_checkpoint
from pipeline.model.engine import patience_stopper, train
from pipeline.model.heads import Head, TopModel
from pipeline.params import Params
from pipeline.progress import say
from pipeline.tracking import lineage, logs, runs

HEAD_DROPOUT = 0.2


def run(params: Params) -> tuple[dict, list]:
    meta = features.read_meta()
    h = params.train_head
    seed_everything(params.seed)
    # tiny linear problem: fp32 on the CPU is fastest and exactly reproducible
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None)
    head = Head(meta["num_features"], len(meta["classes"]), HEAD_DROPOUT)
    model = TopModel(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    best_state, history = train(
        model, optimizer, features.source("train", 0).resident(runtime), features.source("val", 0).resident(runtime),
        epochs=h.epochs, batch_size=h.batch_size, runtime=runtime, seed=params.seed,
        label_smoothing=h.label_smoothing, on_epoch=patience_stopper(h.patience),
    )
    head_state = {k.removeprefix("head."): v for k, v in best_state.items()}
    config = model_config(meta, 0, HEAD_DROPOUT, params.data.max_image_pixels, head_only=True)
    save_checkpoint(paths.HEAD_DIR, head_state, config)
    best = max(history, key=lambda r: (r.val_accuracy, -r.val_loss))
    return {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
            "epochs_run": len(history), "best_epoch": best.epoch}, history


def main(params: Params) -> None:
    logged = logs.flatten("train_head", vars(params.train_head))
    with runs.stage_run("train_head", params.mlflow.experiment, logged, defer=True) as mlrun:  # logs at the end
        summary, history = run(params)
        logs.log_curve(history)
        logs.log_metrics({"best_val_accuracy": summary["val_accuracy"],
                              "best_val_loss": summary["val_loss"]})
        write_json(paths.stage_metrics("train_head"), summary)
        write_json(paths.PLOTS_DIR / "train_head_curve.json",
                   [vars(r) for r in history])
        lineage.record_run("train_head", mlrun.info.run_id)
    say(
        f"train_head: val accuracy {summary['val_accuracy']:.4f} "
        f"(best of {summary['epochs_run']} epochs at epoch {summary['best_epoch']})"
    )
