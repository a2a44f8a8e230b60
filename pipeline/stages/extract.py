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

from pipeline import paths
from pipeline.atomic import atomic_path, write_json
from pipeline.data.datasets import SPLITS
from pipeline.devices import select_runtime
from pipeline.model.backbones import build_backbone
from pipeline.model.bn_folding import folded_copy
from pipeline.model.features import CACHE_DTYPE, check_cache_blocks, extract_split
from pipeline.params import Params
from pipeline.progress import bar, say
from pipeline.tracking import lineage, logs, runs


def run(params: Params) -> dict:
    manifest = pd.read_csv(paths.MANIFEST)
    images = np.load(paths.IMAGES, mmap_mode="r")
    classes = json.loads(paths.CLASSES.read_text())["classes"]
    e = params.extract
    runtime = select_runtime(e.precision)
    batch_size = runtime.inference_batch_size(e.batch_size)
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
                          e.cache_blocks, batch_size, runtime, params.seed + i, out, split, pb)
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
            "device": runtime.device.type,
            "batch_size": batch_size,
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
        "batch_size": batch_size,
    }


def main(params: Params) -> None:
    logged = {**logs.flatten("backbone", vars(params.backbone)),
              **logs.flatten("extract", vars(params.extract))}
    with runs.stage_run("extract", params.mlflow.experiment, logged, defer=True) as mlrun:  # logs at the end
        stats = run(params)
        logs.log_metrics({
            "extract_images_per_second": stats["images_per_second"],
            "extract_seconds": stats["seconds"],
            "cache_bytes_per_view": stats["cache_bytes_per_view"],
            "extract_batch_size_used": stats["batch_size"],
        })
        logs.set_tags({"precision": stats["precision"], "device": stats["device"]})
        lineage.record_run("extract", mlrun.info.run_id)
    say(
        f"extract: {stats['forwards']} forward passes in {stats['seconds']:.1f}s "
        f"({stats['images_per_second']:.0f} img/s, {stats['precision']} on {stats['device']}, "
        f"batches of {stats['batch_size']}); "
        f"activation cache {stats['cache_bytes_per_view'] / 1024:.1f} KiB per image view"
    )
