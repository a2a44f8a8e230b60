"""Self-describing checkpoints: safetensors weights + a JSON of what built them.

Nothing is ever unpickled: weights are safetensors, the description is JSON.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import PipelineError
from pipeline.model.backbones import build_backbone
from pipeline.model.heads import Classifier, EnsembleClassifier, Head, TopModel
from pipeline.paths import CONFIG_FILE, WEIGHTS_FILE

FORMAT_VERSION = 1


def model_config(meta: dict, k: int, dropout: float, max_image_pixels: int, head_only: bool, **extra) -> dict:
    """What every checkpoint (head-only or fine-tuned) says about the model it holds, from
    extract's features meta: enough to rebuild it and to feed it images as training did."""
    return {
        "head_only": head_only,  # weights of the head only; the backbone comes from backbone_weights
        "backbone": meta["backbone"],
        "backbone_weights": meta["backbone_weights"],
        "num_features": meta["num_features"],
        "dropout": dropout,
        "classes": meta["classes"],
        "image_size": meta["image_size"],
        "input_config": meta["input_config"],
        "k": k,
        # serving decodes no larger image than prepare accepted (Pillow's own check is off)
        "max_image_pixels": max_image_pixels,
        **extra,
    }


def save_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write weights then config, each atomically; config last so its presence means complete."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_json(directory / CONFIG_FILE, {"format_version": FORMAT_VERSION, **config})


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing — run the stage that writes it (dvc repro)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}) — re-run the stage") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise PipelineError(f"{path}: unsupported checkpoint format {config.get('format_version')}")
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise PipelineError(f"{path} is missing — run the stage that writes it (dvc repro)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors refuses anything that is not safetensors
        raise PipelineError(
            f"{path} is not a safetensors weights file ({type(exc).__name__}) — it was not written "
            "by this pipeline; re-run the stage"
        ) from None


def load_head(directory: Path) -> tuple[Head, dict]:
    """The head of a head-only checkpoint (train_head's), with its config."""
    config = read_config(directory)
    head = Head(config["num_features"], len(config["classes"]), config["dropout"])
    head.load_state_dict(read_weights(directory))
    return head, config


def load_classifier(directory: Path) -> tuple[Classifier | EnsembleClassifier, dict]:
    """Rebuild the assembled model (backbone + head, or an ensemble) described by a checkpoint folder.

    A head-only checkpoint ('head_only': true) stores just the head; its backbone is rebuilt
    from the weights source named in the config.
    """
    config = read_config(directory)
    state = read_weights(directory)
    head = Head(config["num_features"], len(config["classes"]), config["dropout"])
    if config.get("members"):  # an ensemble of fine-tuned top models on one frozen bottom
        backbone = build_backbone(config["backbone"], "none")
        top = TopModel.top_of(backbone, head, config["k"])
        model = EnsembleClassifier(backbone, [copy.deepcopy(top) for _ in config["members"]])
        model.load_state_dict(state)
        return model.eval(), config
    if config.get("head_only"):
        head.load_state_dict(state)
        return Classifier(build_backbone(config["backbone"], config["backbone_weights"]), head).eval(), config
    model = Classifier(build_backbone(config["backbone"], "none"), head)
    model.load_state_dict(state)
    return model.eval(), config
