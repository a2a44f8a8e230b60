"""Read what extract cached: metadata, labels, pooled features and cut activations (memory-mapped)."""

from __future__ import annotations

import json

import numpy as np

from pipeline import paths
from pipeline.engine import ArraySource
from pipeline.errors import PipelineError


def read_meta() -> dict:
    if not paths.FEATURES_META.is_file():
        raise PipelineError(f"{paths.FEATURES_META} is missing — run `dvc repro extract` first")
    return json.loads(paths.FEATURES_META.read_text())


def labels(split: str) -> np.ndarray:
    return np.load(paths.FEATURES_DIR / f"{split}_labels.npy")


def rows(split: str) -> np.ndarray:
    """Row numbers of the split's images in the manifest / images.npy."""
    return np.load(paths.FEATURES_DIR / f"{split}_rows.npy")


def source(split: str, k: int) -> ArraySource:
    """Inputs for a model that trains the top k blocks: pooled features (k=0) or cut k."""
    path = paths.pooled_features(split) if k == 0 else paths.cut_activations(split, k)
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing — k={k} needs extract.cache_blocks >= {k}; raise it and re-run"
        )
    return ArraySource(np.load(path, mmap_mode="r"), labels(split))
