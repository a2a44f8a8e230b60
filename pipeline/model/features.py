"""Read what extract cached: metadata, labels, pooled features and cut activations (memory-mapped)."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import interrupts, paths
from pipeline.data.augment import augment_batch
from pipeline.devices import RESIDENT_SHARE, Runtime, host_available_bytes
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

    def targets(self, indices: np.ndarray) -> torch.Tensor:
        return self.labels[indices]

    @torch.no_grad()
    def batch(self, indices: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        order = np.argsort(indices)  # sorted reads are sequential on a memmap
        pixels = self.runtime.to_device(torch.from_numpy(self.images[self.rows[indices[order]]]))
        if self.augment and views is not None:
            pixels = augment_batch(pixels, self.generator)  # on the device, one draw per image
        x = self.runtime.to_input(normalize(pixels, self.backbone.input_config))
        with self.runtime.autocast():
            out = self.backbone.forward_blocks(x, 0, self.stop)
        out = (Backbone.pool(out) if self.k == 0 else out).float()  # stays on the device
        # back to the order asked for: a gather (an indexed write is a sort and two copies on
        # CUDA under deterministic algorithms); the indices go without a host sync
        return out[self.runtime.to_device(torch.from_numpy(np.argsort(order)))]


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


def device_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, runtime: Runtime):
    """Yield (start, (B, S, S, 3) uint8 batch on the device) over images[rows].

    The decoded images move to the device in chunks as large as a share of its free memory
    (and of the host's, which stages them) allows — for the built-in data (47 MB) and a
    10,000-image folder at 128 px (0.5 GB) that is one chunk per split — instead of one small
    copy per batch.
    """
    per_image = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    room = RESIDENT_SHARE * min(runtime.free_bytes(), host_available_bytes()) / 2  # two chunks live at a handover
    chunk = max(batch_size, int(room) // per_image // batch_size * batch_size)
    for chunk_start in range(0, len(rows), chunk):
        staged = runtime.upload(images, rows[chunk_start : chunk_start + chunk])
        for offset in range(0, len(staged), batch_size):
            yield chunk_start + offset, staged[offset : offset + batch_size]


class CacheWriter:
    """Writes extract's outputs into .npy memmaps one batch behind the device.

    Each batch's results start copying to (pinned) host memory without waiting; the batch
    before it is written to disk while the device computes this one, so the GPU is not idle
    during file writes and there is no per-batch host sync. On the CPU the copies are no-ops.
    """

    def __init__(self, out_dir, split: str, n: int, views: int):
        self.out_dir, self.split, self.n, self.views = out_dir, split, n, views
        self.files: dict[str, np.ndarray] = {}
        self.pending = None

    def put(self, start: int, view: int, outputs: dict[str, torch.Tensor]) -> None:
        host = {name: t.to("cpu", non_blocking=True) for name, t in outputs.items()}
        done = None
        if any(t.device.type == "cuda" for t in outputs.values()):
            done = torch.cuda.Event()
            done.record()
        self._write_pending()
        self.pending = (start, view, host, done)

    def close(self) -> None:
        self._write_pending()
        for array in self.files.values():
            array.flush()

    def _write_pending(self) -> None:
        if self.pending is None:
            return
        start, view, host, done = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()  # this batch's copies have landed (the next batch may still run)
        for name, tensor in host.items():
            array = tensor.numpy()
            if name not in self.files:
                self.files[name] = np.lib.format.open_memmap(
                    self.out_dir / f"{self.split}_{name}.npy", mode="w+", dtype=array.dtype,
                    shape=(self.n, self.views, *array.shape[1:]),
                )
            self.files[name][start : start + len(array), view] = array


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
    """Write {split}_pooled.npy (N, V, D) float32 and {split}_cut{k}.npy (N, V, C, H, W) float16."""
    generator = torch.Generator().manual_seed(seed)  # CPU: the same views on every device
    writer = CacheWriter(out_dir, split, len(rows), views)
    for start, batch in device_batches(images, rows, batch_size, runtime):
        interrupts.check()  # a safe point: between batches
        for view in range(views):
            # view 0 is the image as is; the others are seeded augmentations of it, made on the device
            pixels = batch if view == 0 else augment_batch(batch, generator)
            x = runtime.to_input(normalize(pixels, backbone.input_config))
            pooled, cuts = forward_with_cuts(backbone, x, cache_blocks, runtime)
            # stored dtype and NCHW layout made on the device: half the bytes to copy back
            outputs = {"pooled": pooled.float()}
            outputs.update({f"cut{k}": t.to(CACHE_TORCH_DTYPE).contiguous() for k, t in cuts.items()})
            writer.put(start, view, outputs)
            progress.update(len(batch))
    writer.close()
