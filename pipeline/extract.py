"""Stage extract: run the frozen backbone once over every image and cache what training needs.

For each split it writes the pooled features (what train_head learns from) and, for the top K
blocks, the activation entering each block (what a finetune trial that unfreezes k blocks
starts from) — so a trial never recomputes the frozen part of the network. Training images get
`views` versions: view 0 as is, the others augmented, so cached training still sees
augmentation.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch

from pipeline import paths, tracking
from pipeline.atomic import atomic_path, write_json
from pipeline.augment import augment
from pipeline.backbones import Backbone, build_backbone, normalize
from pipeline.bn_folding import folded_copy
from pipeline.datasets import SPLITS
from pipeline.devices import Runtime, select_runtime
from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.progress import bar, say

CACHE_DTYPE = np.float16  # half the bytes of fp32; activations of these nets fit its range
CACHE_TORCH_DTYPE = torch.float16


def cut_block_index(num_blocks: int, k: int) -> int:
    """Index of the lowest unfrozen block when the top k are trained."""
    return num_blocks - k


@torch.inference_mode()
def forward_with_cuts(
    backbone: Backbone, x: torch.Tensor, cache_blocks: int, runtime: Runtime
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Pooled features and {k: input of the k-th block from the top} for k = 1..K."""
    n = len(backbone.blocks)
    wanted = {cut_block_index(n, k): k for k in range(1, cache_blocks + 1)}
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


def run(params: Params) -> dict:
    manifest = pd.read_csv(paths.MANIFEST)
    images = np.load(paths.IMAGES, mmap_mode="r")
    classes = json.loads(paths.CLASSES.read_text())["classes"]
    e = params.extract
    runtime = select_runtime(e.precision)
    backbone = folded_copy(build_backbone(params.backbone.name, params.backbone.weights))
    backbone = backbone.to(runtime.device).to(memory_format=torch.channels_last)
    check_cache_blocks(backbone, e.cache_blocks)
    counts = {s: int((manifest.split == s).sum()) for s in SPLITS}
    total = sum(counts[s] * (e.views if s == "train" else 1) for s in SPLITS)
    started = time.perf_counter()
    with atomic_path(paths.FEATURES_DIR) as out, bar(total, f"extract [{runtime.precision}]") as pb:
        out.mkdir()
        for i, split in enumerate(SPLITS):
            rows = manifest.index[manifest.split == split].to_numpy()
            views = e.views if split == "train" else 1
            extract_split(backbone, images, manifest["index"].to_numpy()[rows], views,
                          e.cache_blocks, e.batch_size, runtime, params.seed + i, out, split, pb)
            np.save(out / f"{split}_labels.npy", manifest.label_index.to_numpy()[rows])
            np.save(out / f"{split}_rows.npy", rows)
        seconds = time.perf_counter() - started
        cut_shapes = {
            k: list(np.load(out / f"train_cut{k}.npy", mmap_mode="r").shape[2:])
            for k in range(1, e.cache_blocks + 1)
        }
        meta = {
            "backbone": params.backbone.name,
            "backbone_weights": params.backbone.weights,
            "num_blocks": len(backbone.blocks),
            "num_features": backbone.num_features,
            "input_config": backbone.input_config,
            "image_size": params.data.image_size,
            "classes": list(classes),
            "views": e.views,
            "cache_blocks": e.cache_blocks,
            "cut_shapes": cut_shapes,
            "cache_dtype": np.dtype(CACHE_DTYPE).name,
            "precision": runtime.precision,
        }
        write_json(out / paths.FEATURES_META.name, meta)
    bytes_per_view = sum(int(np.prod(s)) for s in cut_shapes.values()) * np.dtype(CACHE_DTYPE).itemsize
    return {
        "images_per_second": total / seconds,
        "seconds": seconds,
        "forwards": total,
        "cache_bytes_per_view": bytes_per_view,
        "precision": runtime.precision,
        "device": runtime.device.type,
    }


def main(params: Params) -> None:
    logged = {**tracking.flatten("backbone", vars(params.backbone)),
              **tracking.flatten("extract", vars(params.extract))}
    with tracking.stage_run("extract", params.mlflow.experiment, logged) as mlrun:
        stats = run(params)
        tracking.log_metrics({
            "extract_images_per_second": stats["images_per_second"],
            "extract_seconds": stats["seconds"],
            "cache_bytes_per_view": stats["cache_bytes_per_view"],
        })
        tracking.set_tags({"precision": stats["precision"], "device": stats["device"]})
        tracking.record_run("extract", mlrun.info.run_id)
    say(
        f"extract: {stats['forwards']} forward passes in {stats['seconds']:.1f}s "
        f"({stats['images_per_second']:.0f} img/s, {stats['precision']} on {stats['device']}); "
        f"activation cache {stats['cache_bytes_per_view'] / 1024:.1f} KiB per image view"
    )
