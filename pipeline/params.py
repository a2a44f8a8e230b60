"""params.yaml → frozen dataclasses. Unknown, missing or ill-typed keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

Range = tuple[float, float]
BatchSize = int | str  # a positive integer, or "auto": chosen at run time for the device


@dataclass(frozen=True)
class DataParams:
    source: str
    image_size: int
    val_fraction: float
    test_fraction: float
    min_images_per_class: int
    max_image_pixels: int


@dataclass(frozen=True)
class ShapesParams:
    classes: tuple[str, ...]
    images_per_class: int
    image_size: int
    clutter: int
    min_size: float
    max_size: float


@dataclass(frozen=True)
class BackboneParams:
    name: str
    weights: str


@dataclass(frozen=True)
class ExtractParams:
    batch_size: BatchSize
    views: int
    cache_blocks: int
    precision: str


@dataclass(frozen=True)
class AuditParams:
    action: str
    folds: int
    regularization: float
    filter_by: str
    duplicate_similarity: float


@dataclass(frozen=True)
class TrainHeadParams:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    patience: int


@dataclass(frozen=True)
class FinetuneParams:
    n_trials: int
    epochs: int
    batch_size: int
    max_unfreeze: int
    head_lr: Range
    backbone_lr_ratio: Range
    layer_decay: Range
    weight_decay: Range
    label_smoothing: float
    bn_train: bool
    pruner: str
    pruner_warmup_epochs: int
    timeout_minutes: float
    precision: str
    workers: int
    cache: bool
    compile: bool
    rescore_top: int
    rescore_seeds: int
    ship_significance: float


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: BatchSize
    model_name: str
    significance: float
    min_gain: float


@dataclass(frozen=True)
class MlflowParams:
    experiment: str


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    shapes: ShapesParams
    backbone: BackboneParams
    extract: ExtractParams
    audit: AuditParams
    train_head: TrainHeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    mlflow: MlflowParams


_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_PRUNERS = ("median", "hyperband", "none")
_AUDIT_ACTIONS = ("report", "exclude")
_AUDIT_FILTERS = ("both", "prune_by_noise_rate", "prune_by_class", "confident_learning", "predicted_neq_given")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-05` — how DVC writes `-S key=[1e-5, ...]` back
    into params.yaml — as a string; here it is the number it is."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_params(path: Path) -> Params:
    """Read and validate params.yaml; every problem is a PipelineError naming the key."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found — run from the project root or create params.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc}) — fix the syntax") from None
    params = _build(Params, raw, "")
    _check_ranges(params)
    return params


def params_hash(params: Params) -> str:
    """A stable digest of every param, for lineage tags."""
    blob = json.dumps(dataclasses.asdict(params), sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(cls, raw, prefix: str):
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise PipelineError(f"params.yaml: {where} must be a mapping of keys — fix its layout")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(
            f"params.yaml: unknown key {prefix}{unknown[0]} — remove it or use one of: {', '.join(names)}"
        )
    values = {}
    for name in names:
        key = f"{prefix}{name}"
        if name not in raw:
            raise PipelineError(f"params.yaml: missing key {key} — add it (see the shipped params.yaml)")
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if hint == BatchSize:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise PipelineError(f"params.yaml: {key} must be a positive integer or auto, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PipelineError(f"params.yaml: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PipelineError(f"params.yaml: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise PipelineError(f"params.yaml: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str) and value:
            return value
        raise PipelineError(f"params.yaml: {key} must be a non-empty string, got {value!r}")
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise PipelineError(f"params.yaml: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PipelineError(
                f"params.yaml: {key} must be a [low, high] pair, got {value!r}"
            )
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    raise TypeError(f"unsupported param type {hint}")


def _check_ranges(p: Params) -> None:
    def require(ok: bool, key: str, rule: str, value) -> None:
        if not ok:
            raise PipelineError(f"params.yaml: {key} {rule}, got {value!r} — change it")

    def positive_range(key: str, rng: Range, upper: float | None = None) -> None:
        low, high = rng
        require(0 < low <= high, key, "must be [low, high] with 0 < low <= high", list(rng))
        if upper is not None:
            require(high <= upper, key, f"must not exceed {upper}", list(rng))

    d = p.data
    require(d.image_size >= 32, "data.image_size", "must be at least 32", d.image_size)
    require(0 < d.val_fraction < 1, "data.val_fraction", "must be between 0 and 1", d.val_fraction)
    require(0 < d.test_fraction < 1, "data.test_fraction", "must be between 0 and 1", d.test_fraction)
    require(
        d.val_fraction + d.test_fraction < 0.9,
        "data.val_fraction + data.test_fraction",
        "must leave at least 10% for training",
        d.val_fraction + d.test_fraction,
    )
    require(d.min_images_per_class >= 3, "data.min_images_per_class", "must be at least 3",
            d.min_images_per_class)
    require(d.max_image_pixels > 0, "data.max_image_pixels", "must be positive", d.max_image_pixels)
    s = p.shapes
    require(len(s.classes) >= 2, "shapes.classes", "needs at least two classes", list(s.classes))
    require(s.images_per_class >= 1, "shapes.images_per_class", "must be positive",
            s.images_per_class)
    require(s.image_size >= 32, "shapes.image_size", "must be at least 32", s.image_size)
    require(s.clutter >= 0, "shapes.clutter", "must be 0 or more", s.clutter)
    require(0 < s.min_size <= s.max_size <= 0.5, "shapes.min_size/max_size",
            "must satisfy 0 < min_size <= max_size <= 0.5", [s.min_size, s.max_size])
    e = p.extract
    require(e.batch_size == "auto" or e.batch_size >= 1, "extract.batch_size", "must be positive or auto",
            e.batch_size)
    require(e.views >= 1, "extract.views", "must be 1 or more", e.views)
    require(e.cache_blocks >= 0, "extract.cache_blocks", "must be 0 or more", e.cache_blocks)
    require(e.precision in _PRECISIONS, "extract.precision", f"must be one of {_PRECISIONS}",
            e.precision)
    a = p.audit
    require(a.action in _AUDIT_ACTIONS, "audit.action", f"must be one of {_AUDIT_ACTIONS}", a.action)
    require(a.folds >= 2, "audit.folds", "must be 2 or more", a.folds)
    require(a.regularization > 0, "audit.regularization", "must be positive", a.regularization)
    require(a.filter_by in _AUDIT_FILTERS, "audit.filter_by", f"must be one of {_AUDIT_FILTERS}", a.filter_by)
    require(0 < a.duplicate_similarity <= 1, "audit.duplicate_similarity", "must be in (0, 1]",
            a.duplicate_similarity)
    h = p.train_head
    require(h.epochs >= 1, "train_head.epochs", "must be positive", h.epochs)
    require(h.batch_size >= 1, "train_head.batch_size", "must be positive", h.batch_size)
    require(h.lr > 0, "train_head.lr", "must be positive", h.lr)
    require(h.weight_decay >= 0, "train_head.weight_decay", "must be 0 or more", h.weight_decay)
    require(0 <= h.label_smoothing < 1, "train_head.label_smoothing", "must be in [0, 1)",
            h.label_smoothing)
    require(h.patience >= 1, "train_head.patience", "must be positive", h.patience)
    f = p.finetune
    require(f.n_trials >= 1, "finetune.n_trials", "must be positive", f.n_trials)
    require(f.epochs >= 1, "finetune.epochs", "must be positive", f.epochs)
    require(f.batch_size >= 1, "finetune.batch_size", "must be positive", f.batch_size)
    require(f.max_unfreeze >= 0, "finetune.max_unfreeze", "must be 0 or more", f.max_unfreeze)
    require(
        f.max_unfreeze <= e.cache_blocks,
        "finetune.max_unfreeze",
        f"must not exceed extract.cache_blocks ({e.cache_blocks}); raise that or lower this",
        f.max_unfreeze,
    )
    positive_range("finetune.head_lr", f.head_lr)
    positive_range("finetune.backbone_lr_ratio", f.backbone_lr_ratio, upper=1.0)
    positive_range("finetune.layer_decay", f.layer_decay, upper=1.0)
    positive_range("finetune.weight_decay", f.weight_decay)
    require(0 <= f.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)",
            f.label_smoothing)
    require(f.pruner in _PRUNERS, "finetune.pruner", f"must be one of {_PRUNERS}", f.pruner)
    require(f.pruner_warmup_epochs >= 0, "finetune.pruner_warmup_epochs", "must be 0 or more",
            f.pruner_warmup_epochs)
    require(f.timeout_minutes >= 0, "finetune.timeout_minutes", "must be 0 or more",
            f.timeout_minutes)
    require(f.precision in _PRECISIONS, "finetune.precision", f"must be one of {_PRECISIONS}",
            f.precision)
    require(f.workers >= 1, "finetune.workers", "must be 1 or more", f.workers)
    require(f.rescore_top >= 1, "finetune.rescore_top", "must be 1 or more", f.rescore_top)
    require(f.rescore_seeds >= 1, "finetune.rescore_seeds", "must be 1 or more", f.rescore_seeds)
    require(0 < f.ship_significance < 1, "finetune.ship_significance", "must be between 0 and 1",
            f.ship_significance)
    v = p.evaluate
    require(v.batch_size == "auto" or v.batch_size >= 1, "evaluate.batch_size", "must be positive or auto",
            v.batch_size)
    require(0 < v.significance < 1, "evaluate.significance", "must be between 0 and 1", v.significance)
    require(-1 <= v.min_gain <= 1, "evaluate.min_gain", "must be an accuracy difference in [-1, 1]",
            v.min_gain)
