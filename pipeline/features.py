"""Read what extract cached: metadata, labels, pooled features and cut activations (memory-mapped)."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import paths
from pipeline.augment import augment
from pipeline.backbones import Backbone, normalize
from pipeline.devices import Runtime
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


class LiveSource:
    """The no-cache fallback: runs the frozen prefix on the fly, with online augmentation.

    Same semantics as the cached path (a trial trains the top k blocks on what the frozen
    blocks below them output), for data too large to cache: the price is running the frozen
    prefix every epoch.
    """

    views = 1

    def __init__(self, split: str, k: int, backbone: Backbone, runtime: Runtime, augment: bool, seed: int):
        self.images = np.load(paths.IMAGES, mmap_mode="r")
        self.rows = rows(split)
        self.labels = torch.as_tensor(labels(split), dtype=torch.long)
        self.k, self.backbone, self.runtime, self.augment = k, backbone, runtime, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = len(backbone.blocks) - k

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def batch(self, indices: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        order = np.argsort(indices)
        pixels = torch.from_numpy(self.images[self.rows[indices[order]]])
        if self.augment and views is not None:
            pixels = torch.stack([augment(img, self.generator) for img in pixels])
        x = self.runtime.to_input(normalize(pixels, self.backbone.input_config))
        with self.runtime.autocast():
            out = self.backbone.forward_blocks(x, 0, self.stop)
        out = (Backbone.pool(out) if self.k == 0 else out).float().cpu()
        result = torch.empty_like(out)
        result[torch.as_tensor(order)] = out
        return result
