"""`python -m pipeline STAGE` runs one DVC stage; other commands serve the registered model."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

from pipeline import interrupts
from pipeline.errors import PipelineError, Terminated

STAGES = {
    "shapes": "generate the built-in shapes data set (data/shapes)",
    "prepare": "validate, quarantine, split and decode the images",
    "extract": "cache frozen-backbone features and activations",
    "audit": "find suspected label errors and near-duplicates across splits (data/audit)",
    "train_head": "train the head on cached features (feature extraction)",
    "finetune": "Optuna search over unfrozen blocks and learning rates",
    "evaluate": "score on the test images, register in MLflow",
    "report": "write reports/report.md (metrics, gate decision, figures) and log it to MLflow",
}

TRACKED = {*STAGES, "worker"} - {"shapes"}  # commands that log to MLflow


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (argparse turns the error into one usage line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def block_counts(text: str) -> list[int]:
    """argparse type: comma-separated unfrozen block counts, e.g. 0,1,2,4."""
    try:
        counts = [int(k) for k in text.split(",")]
    except ValueError:
        counts = [-1]
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block counts like 0,1,2,4")
    return counts


def fractions(text: str) -> list[float]:
    """argparse type: comma-separated fractions in (0, 1), e.g. 0.02,0.05."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = [-1.0]
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fractions like 0.02,0.05")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Transfer-learning pipeline. Stages are normally run by `dvc repro`.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, help_text in STAGES.items():
        sub = commands.add_parser(stage, help=f"stage: {help_text}")
        if stage == "finetune":
            sub.add_argument("--workers", type=positive_int, default=None,
                             help="local processes running trials in parallel (default: finetune.workers)")
    worker = commands.add_parser(
        "worker", help="join this project's finetune study and run trials (any machine sharing "
                       "OPTUNA_STORAGE and MLFLOW_TRACKING_URI)")
    worker.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)
    bench = commands.add_parser("bench", help="benchmark our fine-tuning path against a naive loop")
    bench.add_argument("--k", type=block_counts, default="0,1,2,4",
                       help="unfrozen block counts to time (default 0,1,2,4)")
    bench.add_argument("--epochs", type=positive_int, default=3, help="epochs per trial (default 3)")
    bench.add_argument("--trials", type=positive_int, default=4, help="trials per study (default 4)")
    bench.add_argument("--studies", type=positive_int, default=1,
                       help="study comparisons, each with its own sampler seed (default 1)")
    bench.add_argument("--compile", action="store_true",
                       help="our trials through torch.compile (as finetune.compile: true)")
    stability = commands.add_parser(
        "stability", help="run train_head → evaluate for several seeds and once with bf16-sized noise; "
                          "print the shipped model's test accuracy, chosen k, time and spread")
    stability.add_argument("--seeds", type=block_counts, default="42,43,44,45,46",
                           help="comma-separated seeds (default 42,43,44,45,46)")
    stability.add_argument("--no-noise", dest="noise", action="store_false",
                           help="skip the run on noise-perturbed activations")
    stability.add_argument("--keep", type=Path, default=None,
                           help="keep each run's scratch project under this folder (default: a temp dir)")
    noise = commands.add_parser(
        "noise-bench", help="plant label noise in the training images; print the audit's precision and recall "
                            "and the shipped model's test accuracy with audit.action report vs exclude")
    noise.add_argument("--rates", type=fractions, default="0.02,0.05,0.1",
                       help="comma-separated fractions of training images to relabel (default 0.02,0.05,0.1)")
    noise.add_argument("--compare-at", type=float, default=0.05,
                       help="rate at which to run the whole pipeline with report and with exclude (default 0.05)")
    noise.add_argument("--no-compare", dest="compare", action="store_false",
                       help="only measure detection (seconds, not minutes)")
    noise.add_argument("--keep", type=Path, default=None, help="keep the scratch projects under this folder")
    retrain = commands.add_parser(
        "retrain", help="what CI runs: dvc pull, dvc repro (register + gate + report), dvc push, summary")
    retrain.add_argument("--remote", default=None, help="DVC remote (default: the project's default remote)")
    retrain.add_argument("--no-pull", dest="pull", action="store_false", help="skip `dvc pull`")
    retrain.add_argument("--no-push", dest="push", action="store_false", help="skip `dvc push`")
    retrain.add_argument("--summary", type=Path, default=None,
                         help="append the markdown summary here (default: $GITHUB_STEP_SUMMARY when set)")
    lineage = commands.add_parser("lineage", help="show where a registered version came from")
    lineage.add_argument("version", help="registry version number")
    lineage.add_argument("--model-name", default=None, help="registered model (default: evaluate.model_name)")
    predict = commands.add_parser("predict", help="predict image files/folders with a model")
    predict.add_argument("--model", required=True,
                         help='MLflow model URI, e.g. "models:/transfer-classifier@champion", '
                              "or a checkpoint folder such as models/finetuned")
    predict.add_argument("--output", type=Path, default=None, help="CSV path (default: stdout)")
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    export = commands.add_parser(
        "export", help="write a model as ONNX (preprocessing inside, metadata) after checking it against PyTorch")
    export.add_argument("--model", default=None,
                        help='checkpoint folder or MLflow model URI, e.g. "models:/transfer-classifier@champion" '
                             "(default: the model this project ships, per metrics/selection.json)")
    export.add_argument("--out", type=Path, default=None,
                        help="ONNX file to write; onnx_parity.json goes next to it (default: models/onnx/model.onnx)")
    export.add_argument("--images", type=Path, default=None,
                        help="folder of images to check parity on (default: the project's test split)")
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "finetune":
        from pipeline.params import load_params
        from pipeline.stages.finetune import main as finetune_main

        if args.workers is not None and args.workers < 1:
            raise PipelineError("--workers must be 1 or more")
        finetune_main(load_params(args.params), workers=args.workers, params_path=args.params)
    elif args.command in STAGES:
        from pipeline.params import load_params

        params = load_params(args.params)
        importlib.import_module(f"pipeline.stages.{args.command}").main(params)
    elif args.command == "worker":
        from pipeline.params import load_params
        from pipeline.stages.finetune import worker_main

        worker_main(load_params(args.params), args.parent_run_id)
    elif args.command == "bench":
        from pipeline.params import load_params
        from pipeline.tools.bench import main as bench_main

        bench_main(load_params(args.params), args.k, args.epochs, args.trials, args.compile, args.studies)
    elif args.command == "stability":
        from pipeline.tools.stability import main as stability_main

        stability_main(args.seeds, args.noise, args.keep)
    elif args.command == "noise-bench":
        from pipeline.tools.noise_bench import main as noise_main

        noise_main(args.rates, args.compare_at if args.compare else None, keep=args.keep)
    elif args.command == "retrain":
        from pipeline.tools.retrain import main as retrain_main

        retrain_main(args.remote, args.pull, args.push, args.summary)
    elif args.command == "lineage":
        from pipeline.params import load_params
        from pipeline.tracking.lineage import describe

        name = args.model_name or load_params(args.params).evaluate.model_name
        print(describe(name, args.version))
    elif args.command == "predict":
        from pipeline.serving.predict import main as predict_main

        predict_main(args.model, args.paths, args.output)
    elif args.command == "export":
        from pipeline.serving.export import DEFAULT_OUT
        from pipeline.serving.export import main as export_main

        export_main(args.model, args.out or DEFAULT_OUT, args.images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # a stage stops at its next safe point on ^C or SIGTERM; the other commands keep Python's
        # defaults (retrain and stability wait on child processes, which get the signal themselves)
        with interrupts.stop_on_signals() if args.command in TRACKED else contextlib.nullcontext():
            run_command(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"error: cannot write or read {exc.filename} ({exc.strerror}) — fix the permissions of "
              "that path or run from a writable checkout", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} not found — run the stages before this one (`dvc repro`)",
              file=sys.stderr)
        return 2
    except OSError as exc:  # read-only disk, a file where a folder must go, disk full
        print(f"error: cannot write {exc.filename or 'an output'} ({exc.strerror or exc}) — make that path "
              "writable, or free space", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143  # the shell's 128 + signal number
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
