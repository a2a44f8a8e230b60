"""Read what extract cached: metadata, labels, pooled features and cut activations (memory-mapped)."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import interrupts, paths
from pipeline.data.augment import augment
from pipeline.devices import Runtime
from pipeline.errors import PipelineError
from pipeline.model.backbones import Backbone, normalize
from pipeline.model.engine import ArraySource


def read_meta() -> dict:
    if not paths.FEATURES_META.is_file():
        raise PipelineError(f"{paths.FEATURES_META} is missing — run `dvc repro extract` first")
    return json.loads(paths.FEATURES_META.read_text())


def labels(split: str) -> np.ndarray:
    return np.load(paths.FEATURES_DIR / f"{split}_labels.npy")


def rows(split: str) -> np.ndarray:
    """Row numbers of the split's images in the manifest / images.npy."""
    return np.load(paths.FEATURES_DIR / f"{split}_rows.npy")


def used_positions(split: str) -> np.ndarray:
    """Positions of the split's images that training uses: all but those the audit stage
    excluded (audit.action: exclude), which only ever come from the train split."""
    all_positions = np.arange(len(labels(split)))
    if split != "train":
        return all_positions
    if not paths.EXCLUDED.is_file():
        raise PipelineError(f"{paths.EXCLUDED} is missing — run `dvc repro audit` first")
    excluded = set(json.loads(paths.EXCLUDED.read_text())["rows"])
    return all_positions[~np.isin(rows(split), list(excluded))]


def source(split: str, k: int) -> ArraySource:
    """Inputs for a model that trains the top k blocks: pooled features (k=0) or cut k."""
    path = paths.pooled_features(split) if k == 0 else paths.cut_activations(split, k)
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing — k={k} needs extract.cache_blocks >= {k}; raise it and re-run"
        )
    return ArraySource(np.load(path, mmap_mode="r"), labels(split), used_positions(split))


class LiveSource:
    """The no-cache fallback: runs the frozen prefix on the fly, with online augmentation.

    Same semantics as the cached path (a trial trains the top k blocks on what the frozen
    blocks below them output), for data too large to cache: the price is running the frozen
    prefix every epoch.
    """

    views = 1

    def __init__(self, split: str, k: int, backbone: Backbone, runtime: Runtime, augment: bool, seed: int):
        self.images = np.load(paths.IMAGES, mmap_mode="r")
        used = used_positions(split)
        self.rows = rows(split)[used]
        self.labels = torch.as_tensor(labels(split)[used], dtype=torch.long)
        self.k, self.backbone, self.runtime, self.augment = k, backbone, runtime, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = backbone.cut(k)

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


CACHE_DTYPE = np.float16  # half the bytes of fp32; activations of these nets fit its range


CACHE_TORCH_DTYPE = torch.float16


@torch.inference_mode()
def forward_with_cuts(
    backbone: Backbone, x: torch.Tensor, cache_blocks: int, runtime: Runtime
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Pooled features and {k: input of the k-th block from the top} for k = 1..K."""
    wanted = {backbone.cut(k): k for k in range(1, cache_blocks + 1)}
    cuts = {}
    with runtime.autocast():
        for i, block in enumerate(backbone.blocks):
            if i in wanted:
                cuts[wanted[i]] = x
            x = block(x)
    return Backbone.pool(x), cuts


def check_cache_blocks(backbone: Backbone, cache_blocks: int) -> None:
    if cache_blocks > len(backbone.blocks) - 1:
        raise PipelineError(
            f"params.yaml: extract.cache_blocks={cache_blocks} but {backbone.name} has only "
            f"{len(backbone.blocks) - 1} blocks above its stem — lower it"
        )


def extract_split(
    backbone: Backbone,
    images: np.ndarray,
    rows: np.ndarray,
    views: int,
    cache_blocks: int,
    batch_size: int,
    runtime: Runtime,
    seed: int,
    out_dir,
    split: str,
    progress,
) -> None:
    """Write {split}_pooled.npy (N, V, D) and {split}_cut{k}.npy (N, V, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    files = {}
    n = len(rows)
    for start in range(0, n, batch_size):
        interrupts.check()  # a safe point: between batches
        batch = torch.from_numpy(images[rows[start : start + batch_size]])  # reads one batch
        for view in range(views):
            # view 0 is the image as is; the others are seeded augmentations of it
            pixels = batch if view == 0 else torch.stack([augment(img, generator) for img in batch])
            x = runtime.to_input(normalize(pixels, backbone.input_config))
            pooled, cuts = forward_with_cuts(backbone, x, cache_blocks, runtime)
            # convert in torch (one pass, multi-threaded) to the stored dtype and NCHW layout
            arrays = {"pooled": pooled.float().cpu().numpy()}
            arrays.update({f"cut{k}": t.to(CACHE_TORCH_DTYPE).cpu().contiguous().numpy()
                           for k, t in cuts.items()})
            for name, array in arrays.items():
                if name not in files:
                    dtype = np.float32 if name == "pooled" else CACHE_DTYPE
                    files[name] = np.lib.format.open_memmap(
                        out_dir / f"{split}_{name}.npy", mode="w+", dtype=dtype,
                        shape=(n, views, *array.shape[1:]),
                    )
                files[name][start : start + len(batch), view] = array
            progress.update(len(batch))
    for array in files.values():
        array.flush()
