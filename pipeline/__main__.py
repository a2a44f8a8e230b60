"""`python -m pipeline STAGE` runs one DVC stage; other commands serve the registered model."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pipeline.errors import PipelineError

STAGES = {
    "shapes": "generate the built-in shapes data set (data/shapes)",
    "prepare": "validate, quarantine, split and decode the images",
    "extract": "cache frozen-backbone features and activations",
    "train_head": "train the head on cached features (feature extraction)",
    "finetune": "Optuna search over unfrozen blocks and learning rates",
    "evaluate": "score on the test images, register in MLflow",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Transfer-learning pipeline. Stages are normally run by `dvc repro`.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, help_text in STAGES.items():
        commands.add_parser(stage, help=f"stage: {help_text}")
    predict = commands.add_parser("predict", help="predict image files/folders with a model")
    predict.add_argument("--model", required=True,
                         help='MLflow model URI, e.g. "models:/transfer-classifier@champion", '
                              "or a checkpoint folder such as models/finetuned")
    predict.add_argument("--output", type=Path, default=None, help="CSV path (default: stdout)")
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in STAGES:
            from pipeline.params import load_params

            params = load_params(args.params)
            importlib.import_module(f"pipeline.{args.command}").main(params)
        elif args.command == "predict":
            from pipeline.predict import main as predict_main

            predict_main(args.model, args.paths, args.output)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
