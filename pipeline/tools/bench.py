"""`python -m pipeline bench`: our fine-tuning path against the textbook loop, in one process.

Naive baseline: decode the image files every epoch with torchvision transforms, run the whole
network forward (frozen part under requires_grad=False), fp32, NCHW. Ours: decode once
(prepare), one bf16/channels_last pass of the frozen backbone caching the activation at every
cut point (extract), then trials that run only their unfrozen blocks on the cache.
Same data, backbone, trial budget and seeds for both. Figures are measured here, never stored.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import psutil
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import v2

from pipeline import paths
from pipeline.data.augment import augment_batch
from pipeline.data.datasets import decode_threads, scan_source, validate_files
from pipeline.devices import device_name, seed_everything, select_runtime
from pipeline.model import features
from pipeline.model.backbones import build_backbone
from pipeline.model.bn_folding import folded_copy
from pipeline.model.checkpoints import load_head
from pipeline.model.engine import ArraySource, train
from pipeline.model.features import extract_split
from pipeline.model.freezing import freeze_all_but_top, param_groups
from pipeline.model.heads import Classifier, Head, TopModel
from pipeline.params import Params
from pipeline.progress import say
from pipeline.search import study


class PeakMemory:
    """Peak host memory (resident set, sampled) above the starting point while the block runs,
    and on CUDA the peak GPU memory the block allocated above what was allocated before it."""

    def __enter__(self):
        self.gpu_start = self.gpu_peak = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu_start = torch.cuda.memory_allocated()
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak = torch.cuda.max_memory_allocated()

    @property
    def gpu_mib(self) -> float:
        return (self.gpu_peak - self.gpu_start) / 2**20

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


class FileDataset(torch.utils.data.Dataset):
    """The textbook input pipeline: open and decode the file every time."""

    def __init__(self, files: list[Path], labels: np.ndarray, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


@dataclass
class Setup:
    params: Params
    manifest: pd.DataFrame
    classes: list[str]
    size: int
    batch_size: int  # of inference: extract.batch_size as resolved for the device


def naive_transforms(size: int, input_config: dict, train_mode: bool):
    normalize = transforms.Normalize(input_config["mean"], input_config["std"])
    if train_mode:
        return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.55, 1.0)),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               normalize])


def split_files(setup: Setup, split: str) -> tuple[list[Path], np.ndarray]:
    rows = setup.manifest[setup.manifest.split == split]
    root = Path(setup.params.data.source)
    return [root / p for p in rows.path], rows.label_index.to_numpy()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # queued kernels are part of the time


def warm_up(model, x: torch.Tensor, runtime=None) -> None:
    """One untimed forward: CUDA context, cuDNN and kernel selection are not the loop's cost."""
    with torch.no_grad(), (runtime.autocast() if runtime else contextlib.nullcontext()):
        model(x)
    synchronize(x.device)


def naive_extraction(setup: Setup, backbone, device: torch.device) -> float:
    files, labels = split_files(setup, "train")
    loader = torch.utils.data.DataLoader(
        FileDataset(files, labels, naive_transforms(setup.size, backbone.input_config, False)),
        batch_size=setup.batch_size)
    warm_up(backbone, torch.zeros(setup.batch_size, 3, setup.size, setup.size, device=device))
    started = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            backbone(x.to(device))
        synchronize(device)
    return len(files) / (time.perf_counter() - started)


def naive_augment(size: int):
    """The per-image way: torchvision.transforms.v2, applied to one (3, S, S) uint8 tensor at a time."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.55, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.25, contrast=0.25)])


def augmentation_rates(setup: Setup, device: torch.device, rounds: int = 3) -> tuple[float, float]:
    """Images/s augmenting the train images: per image on the CPU, as a textbook loader does,
    vs ours (augment_batch on the device, batches of the inference batch size)."""
    images = np.load(paths.IMAGES, mmap_mode="r")
    pixels = torch.from_numpy(np.ascontiguousarray(images[features.rows("train")]))
    torch.manual_seed(setup.params.seed)
    transform = naive_augment(setup.size)
    started = time.perf_counter()
    for _ in range(rounds):
        for image in pixels:
            transform(image.permute(2, 0, 1))
    naive = rounds * len(pixels) / (time.perf_counter() - started)
    on_device = pixels.to(device)
    generator = torch.Generator().manual_seed(setup.params.seed)
    augment_batch(on_device[: setup.batch_size], generator)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(rounds):
        for start in range(0, len(on_device), setup.batch_size):
            augment_batch(on_device[start : start + setup.batch_size], generator)
    synchronize(device)
    return naive, rounds * len(pixels) / (time.perf_counter() - started)


def decoding_rates(setup: Setup) -> tuple[float, float, int]:
    """Images/s validating and decoding the data folder as prepare does: one image at a time vs
    prepare's threads (same files, same results). Returns (one thread, threaded, threads)."""
    root = Path(setup.params.data.source)
    _, files, _ = scan_source(root)
    d, threads = setup.params.data, decode_threads()
    rates = []
    for n in (1, threads):
        # into a memory-mapped scratch file, as prepare decodes: a large folder never sits in RAM
        with tempfile.TemporaryDirectory() as scratch:
            decoded = open_memmap(Path(scratch) / "decoded.npy", mode="w+", dtype=np.uint8,
                                  shape=(len(files), d.image_size, d.image_size, 3))
            started = time.perf_counter()
            validate_files(root, files, d.image_size, d.max_image_pixels, decoded_into=decoded, threads=n)
            rates.append(len(files) / (time.perf_counter() - started))
            del decoded
    return rates[0], rates[1], threads


def naive_trial(setup: Setup, backbone, head: Head, config: study.TrialConfig, epochs: int, seed: int,
                report=None) -> float:
    """Full forward every step, fp32 NCHW on the same device as ours; the frozen part only has
    requires_grad=False."""
    seed_everything(seed)
    device = next(backbone.parameters()).device
    f = setup.params.finetune
    model = Classifier(copy.deepcopy(backbone), copy.deepcopy(head))
    freeze_all_but_top(model.backbone.blocks, config.k, f.bn_train)
    optimizer = torch.optim.AdamW(param_groups(model.backbone.blocks, model.head, config.k, config.head_lr,
                                               config.backbone_lr, config.layer_decay, config.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train_files, train_labels = split_files(setup, "train")
    val_files, val_labels = split_files(setup, "val")
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        FileDataset(train_files, train_labels, naive_transforms(setup.size, backbone.input_config, True)),
        batch_size=f.batch_size, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(
        FileDataset(val_files, val_labels, naive_transforms(setup.size, backbone.input_config, False)),
        batch_size=f.batch_size * 2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
    best = 0.0
    for epoch in range(1, epochs + 1):
        model.head.train()
        freeze_all_but_top(model.backbone.blocks, config.k, f.bn_train)
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        accuracy = correct / len(val_files)
        best = max(best, accuracy)
        if report is not None:
            report(accuracy, epoch)
    return best


def cached_trial(setup: Setup, backbone, head: Head, cache_dir: Path, config: study.TrialConfig, epochs: int,
                 seed: int, report=None) -> tuple[float, str]:
    """(best val accuracy, the precision it trained in: what finetune's runtime chose)."""
    seed_everything(seed)
    f = setup.params.finetune
    runtime = select_runtime(f.precision, training=True)
    model = copy.deepcopy(TopModel.top_of(backbone, head, config.k)).to(memory_format=torch.channels_last)
    freeze_all_but_top(model.blocks, config.k, f.bn_train)
    optimizer = torch.optim.AdamW(param_groups(model.blocks, model.head, config.k, config.head_lr,
                                               config.backbone_lr, config.layer_decay, config.weight_decay))

    def load(split):
        name = f"{split}_pooled.npy" if config.k == 0 else f"{split}_cut{config.k}.npy"
        cached = ArraySource(np.load(cache_dir / name, mmap_mode="r"), np.load(cache_dir / f"{split}_labels.npy"))
        return cached.resident(runtime)  # on the device, as finetune holds it

    def on_epoch(result):
        if report is not None:
            report(result.val_accuracy, result.epoch)
        return False

    def set_train_mode():
        model.head.train()
        freeze_all_but_top(model.blocks, config.k, f.bn_train)

    _, history = train(model, optimizer, load("train"), load("val"), epochs=epochs, batch_size=f.batch_size,
                       runtime=runtime, seed=seed, label_smoothing=f.label_smoothing,
                       set_train_mode=set_train_mode, on_epoch=on_epoch, compile_model=f.compile)
    return max(r.val_accuracy for r in history), runtime.precision


def our_extraction(setup: Setup, fast, cache_dir: Path, cache_blocks: int, train_views: int) -> float:
    """fast: the BatchNorm-folded backbone, on the device, as extract runs it."""
    runtime = select_runtime(setup.params.extract.precision)
    images = np.load(paths.IMAGES, mmap_mode="r")
    x = torch.zeros(setup.batch_size, 3, setup.size, setup.size, device=runtime.device)
    warm_up(fast, x.contiguous(memory_format=torch.channels_last), runtime)
    total = 0
    started = time.perf_counter()
    for i, split in enumerate(("train", "val")):
        rows = features.rows(split)
        views = train_views if split == "train" else 1
        extract_split(fast, images, rows, views, cache_blocks, setup.batch_size, runtime,
                      setup.params.seed + i, cache_dir, split, _NoBar())
        np.save(cache_dir / f"{split}_labels.npy", features.labels(split))
        total += len(rows) * views
    return total / (time.perf_counter() - started), runtime


class _NoBar:
    def update(self, n):
        pass


def run_study(trial_fn, setup: Setup, n_trials: int) -> tuple[float, float]:
    """A seeded study of n_trials with the configured sampler and pruner; (seconds, best value)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # before create_study: it logs "created" at INFO
    s = optuna.create_study(direction="maximize", sampler=study.make_sampler(setup.params),
                            pruner=study.make_pruner(setup.params))

    def objective(trial):
        config = study.suggest(trial, setup.params)

        def report(value, epoch):
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return trial_fn(config, setup.params.seed + trial.number, report)

    started = time.perf_counter()
    s.optimize(objective, n_trials=n_trials)
    return time.perf_counter() - started, s.best_value


def starting_head(backbone, classes: list[str], seed: int) -> tuple[Head, str]:
    """The head every trial starts from, on both paths: train_head's, as in finetune (LP-FT);
    a seeded random one when train_head has not run for this backbone and classes."""
    if (paths.HEAD_DIR / paths.CONFIG_FILE).is_file():
        head, config = load_head(paths.HEAD_DIR)
        if config["num_features"] == backbone.num_features and config["classes"] == classes:
            return head, f"the trained head ({paths.HEAD_DIR})"
    seed_everything(seed)
    random_head = Head(backbone.num_features, len(classes), 0.2)
    return random_head, "a random head (run `dvc repro train_head` for the trained one)"


def main(params: Params, ks: list[int], epochs: int, n_trials: int, compile_model: bool = False,
         studies: int = 1) -> None:
    if compile_model:
        params = replace(params, finetune=replace(params.finetune, compile=True))

    manifest = pd.read_csv(paths.MANIFEST)
    classes = json.loads(paths.CLASSES.read_text())["classes"]
    # both paths on the device the pipeline would use (PIPELINE_DEVICE=cpu forces the CPU)
    inference = select_runtime(params.extract.precision)
    device = inference.device
    setup = Setup(params, manifest, classes, params.data.image_size,
                  inference.inference_batch_size(params.extract.batch_size))
    backbone = build_backbone(params.backbone.name, params.backbone.weights)
    head, head_source = starting_head(backbone, classes, params.seed)
    # folded on the CPU in exact fp32, as extract does (TF32 convolutions on a GPU could fail
    # the fold's exactness check and leave blocks unfolded), then moved
    fast = folded_copy(backbone).to(device).to(memory_format=torch.channels_last)
    backbone, head = backbone.to(device), head.to(device)
    # the cache must reach every k timed and every k the study may draw
    cache_blocks = max(*ks, min(params.finetune.max_unfreeze, params.extract.cache_blocks))
    fixed = study.TrialConfig(k=0, head_lr=3e-3, backbone_lr=1e-3, layer_decay=0.8, weight_decay=1e-4)
    rows: list[tuple[str, float, float, str]] = []
    say(f"bench: {params.backbone.name} at {setup.size}px, {int((manifest.split == 'train').sum())} train / "
        f"{int((manifest.split == 'val').sum())} val images, {epochs} epochs per trial, "
        f"{torch.get_num_threads()} threads, on {device_name(device)}, inference batches of {setup.batch_size}"
        f"{', our trials torch.compiled' if params.finetune.compile else ''}; "
        f"trials start from {head_source}")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        with PeakMemory() as naive_mem:
            naive_rate = naive_extraction(setup, backbone, device)
        with tempfile.TemporaryDirectory() as plain_dir:  # like for like: one plain view per image
            our_rate, runtime = our_extraction(setup, fast, Path(plain_dir), cache_blocks, 1)
        with PeakMemory() as our_mem:  # what the pipeline does: plus augmented views
            views = params.extract.views
            with_views_rate, _ = our_extraction(setup, fast, cache_dir, cache_blocks, views)
        rows.append(("extraction, images/s", naive_rate, our_rate, "higher is better"))
        say(f"  extraction: naive {naive_rate:.1f} img/s, ours {our_rate:.1f} img/s ({runtime.precision}, "
            f"channels_last, writing the cache of the top {cache_blocks} cuts); with {views} views incl. "
            f"augmentation {with_views_rate:.1f} img/s")
        naive_peak, our_peak = naive_mem.mib, our_mem.mib
        naive_gpu, our_gpu = naive_mem.gpu_mib, our_mem.gpu_mib
        naive_aug, our_aug = augmentation_rates(setup, device)
        rows.append(("augmentation, images/s", naive_aug, our_aug, "higher is better"))
        say(f"  augmentation: naive {naive_aug:.0f} img/s (torchvision v2, one image at a time, CPU), "
            f"ours {our_aug:.0f} img/s (augment_batch on {device.type})")
        one_thread, threaded, threads = decoding_rates(setup)
        rows.append(("decoding the folder (prepare), images/s", one_thread, threaded, "higher is better"))
        say(f"  decoding: {one_thread:.0f} img/s one at a time, {threaded:.0f} img/s on prepare's {threads} threads")
        accuracies = []  # same config and seed on both paths: a paired check that ours learns as well
        for k in ks:
            config = study.TrialConfig(**{**vars(fixed), "k": k})
            t0 = time.perf_counter()
            with PeakMemory() as m1:
                naive_acc = naive_trial(setup, backbone, head, config, epochs, params.seed)
            t1 = time.perf_counter()
            with PeakMemory() as m2:
                our_acc, trained_in = cached_trial(setup, backbone, head, cache_dir, config, epochs, params.seed)
            t2 = time.perf_counter()
            naive_peak, our_peak = max(naive_peak, m1.mib), max(our_peak, m2.mib)
            naive_gpu, our_gpu = max(naive_gpu, m1.gpu_mib), max(our_gpu, m2.gpu_mib)
            accuracies.append((naive_acc, our_acc))
            rows.append((f"trial k={k}, seconds", t1 - t0, t2 - t1, "lower is better"))
            say(f"  trial k={k}: naive {t1 - t0:.1f}s (best val accuracy {naive_acc:.3f}), "
                f"ours {t2 - t1:.1f}s ({our_acc:.3f}, trained in {trained_in})")
        rows.append((f"trials k={','.join(map(str, ks))}: mean best val accuracy",
                     float(np.mean([a for a, _ in accuracies])), float(np.mean([b for _, b in accuracies])),
                     "higher is better"))
        studied = []  # (naive seconds, naive best, our seconds, our best) per study seed
        for repeat in range(studies):
            setup.params = replace(dataclass_replace_finetune(params, epochs), seed=params.seed + repeat)
            naive_time, naive_best = run_study(
                lambda c, seed, report: naive_trial(setup, backbone, head, c, epochs, seed, report),
                setup, n_trials)
            our_time, our_best = run_study(
                lambda c, seed, report: cached_trial(setup, backbone, head, cache_dir, c, epochs, seed, report)[0],
                setup, n_trials)
            studied.append((naive_time, naive_best, our_time, our_best))
            say(f"  study seed {setup.params.seed}: naive {naive_time:.1f}s (best val accuracy {naive_best:.3f}), "
                f"ours {our_time:.1f}s ({our_best:.3f})")
        naive_time, naive_best, our_time, our_best = np.mean(studied, axis=0)
        per = f" (mean of {studies} seeds)" if studies > 1 else ""
        rows.append((f"study of {n_trials} trials{per}, seconds", naive_time, our_time, "lower is better"))
        rows.append((f"study best val accuracy{per}", naive_best, our_best, "higher is better"))
        rows.append(("peak extra host memory, MiB", naive_peak, our_peak, "lower is better"))
        if device.type == "cuda":
            rows.append(("peak extra GPU memory, MiB", naive_gpu, our_gpu, "lower is better"))
    say(render(rows))


def dataclass_replace_finetune(params: Params, epochs: int) -> Params:
    return replace(params, finetune=replace(params.finetune, epochs=epochs,
                                            max_unfreeze=min(params.finetune.max_unfreeze,
                                                             params.extract.cache_blocks)))


def render(rows) -> str:
    lines = ["| measure | naive | ours | ours vs naive |", "|---|---:|---:|---:|"]
    for name, naive, ours, direction in rows:
        if "accuracy" in name:
            ratio = f"{ours - naive:+.3f}"
        elif direction == "higher is better":
            ratio = f"{ours / naive:.1f}x faster" if naive else "n/a"
        else:
            ratio = f"{naive / ours:.1f}x {'faster' if 'seconds' in name else 'less'}" if ours else "n/a"
        fmt = "{:.3f}" if "accuracy" in name else "{:.1f}"
        lines.append(f"| {name} | {fmt.format(naive)} | {fmt.format(ours)} | {ratio} |")
    return "\n".join(lines)
