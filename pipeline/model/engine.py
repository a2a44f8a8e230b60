"""Train/eval loops: tensors (or memory-mapped arrays) in, numbers out. No files, MLflow or params."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import interrupts
from pipeline.devices import RESIDENT_SHARE, Runtime, compiled


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float


class ArraySource:
    """Training inputs: an (N, V, ...) array (memmap fine); each epoch reads one view per item."""

    def __init__(self, array: np.ndarray, labels: np.ndarray, positions: np.ndarray | None = None):
        """positions: the rows of `array` to train on (default all); a subset stays memory-mapped."""
        self.array = array
        self.positions = np.arange(len(labels)) if positions is None else np.asarray(positions)
        self.labels = torch.as_tensor(np.asarray(labels)[self.positions], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def views(self) -> int:
        return self.array.shape[1]

    def batch(self, indices: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        order = np.argsort(indices)  # sorted reads are sequential on a memmap
        rows = self.positions[indices[order]]
        picked = self.array[rows, views[order] if views is not None else 0]
        out = torch.empty((len(indices), *picked.shape[1:]), dtype=torch.float32)
        out[torch.as_tensor(order)] = torch.as_tensor(np.ascontiguousarray(picked)).float()
        return out

    def targets(self, indices: np.ndarray) -> torch.Tensor:
        return self.labels[indices]

    @property
    def nbytes(self) -> int:
        """What holding the used rows on the device takes (in the stored dtype)."""
        return int(np.prod(self.array.shape[1:])) * self.array.dtype.itemsize * len(self.positions)

    def resident(self, runtime: Runtime, share: float = RESIDENT_SHARE) -> ArraySource | ResidentSource:
        """This source held as one tensor on the device (GPU memory, or RAM on the CPU) when
        its rows fit in `share` of the free memory, so batches are gathered there without a
        copy from the host per batch; else itself (read from the memmap batch by batch)."""
        return self.on_device(runtime) if runtime.fits(self.nbytes, share) else self

    def on_device(self, runtime: Runtime) -> ResidentSource:
        rows = runtime.upload(self.array, self.positions)  # in the stored dtype (fp16 cuts)
        return ResidentSource(rows, runtime.to_device(self.labels), runtime)


class ResidentInputs:
    """Each k's (train, val) inputs, held on the device while they fit a budget: this process's
    part of RESIDENT_SHARE of the memory free when the first of them was loaded (`sharing`
    processes use the device). A study moves between k, so the least recently used k is let go
    to make room for another: what this holds never grows past the budget, however many k the
    study tries (a k too large for it alone is read from the memmap)."""

    def __init__(self, runtime: Runtime, sharing: int = 1):
        self.runtime, self.share = runtime, RESIDENT_SHARE / sharing
        self.budget: int | None = None
        self.held: OrderedDict[int, tuple[ResidentSource, ...]] = OrderedDict()
        self.loads = 0  # copies to the device so far (a k let go and needed again is copied again)

    def get(self, k: int, sources: Callable[[int], tuple[ArraySource, ...]]):
        """k's inputs: held ones, or `sources(k)` put on the device (or left on the host)."""
        if k in self.held:
            self.held.move_to_end(k)
            return self.held[k]
        if self.budget is None:
            self.budget = int(self.share * self.runtime.free_bytes())
        found = sources(k)
        need = sum(s.nbytes for s in found)
        if need > self.budget:
            return found
        while self.held and self.held_bytes() + need > self.budget:
            self.held.popitem(last=False)  # its device memory goes back to the allocator
        self.held[k] = tuple(s.on_device(self.runtime) for s in found)
        self.loads += 1
        return self.held[k]

    def held_bytes(self) -> int:
        return sum(s.nbytes for held in self.held.values() for s in held)


class ResidentSource:
    """An ArraySource's used rows as (N, V, ...) and (N,) tensors on the device; batches are
    gathered there, with the indices sent along in a non-blocking copy (no host sync)."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, runtime: Runtime):
        self.data, self.labels, self.runtime = data, labels, runtime

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def views(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def _on_device(self, indices: np.ndarray) -> torch.Tensor:
        return self.runtime.to_device(torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)))

    def batch(self, indices: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        idx = self._on_device(indices)
        view = self._on_device(views) if views is not None else torch.zeros_like(idx)
        return self.data[idx, view].float()

    def targets(self, indices: np.ndarray) -> torch.Tensor:
        return self.labels[self._on_device(indices)]


def epoch_view_order(rng: np.random.Generator, n: int, views: int) -> np.ndarray:
    """(n, views): column e is the view each item trains on in epoch e (mod views).

    Each item walks its own random permutation of its views, so in V epochs it sees each of
    them once (view 0 plain, the rest augmented); drawing with replacement repeats some and
    skips others.
    """
    return np.argsort(rng.random((n, views)), axis=1)


def predict_logits(
    model: nn.Module, source: ArraySource, batch_size: int, runtime: Runtime
) -> torch.Tensor:
    """(N, classes) float logits on the CPU; batches stay on the device until one copy at the end."""
    model.eval()
    outputs = []
    with torch.inference_mode(), runtime.autocast():
        for start in range(0, len(source), batch_size):
            interrupts.check()  # a safe point: between batches
            idx = np.arange(start, min(start + batch_size, len(source)))
            outputs.append(model(runtime.to_input(source.batch(idx, None))).float())
    return torch.cat(outputs).cpu() if outputs else torch.empty(0)


def grad_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast, a no-op scaler otherwise.

    fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero in the backward pass, so
    the loss is multiplied up before backward and the gradients divided back (in fp32) before
    the step; a step whose gradients overflowed is skipped and the scale lowered. bf16 has
    fp32's exponent range and fp32 needs nothing, so they get a disabled scaler (a pass-through).
    """
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: ArraySource,
    val: ArraySource,
    epochs: int,
    batch_size: int,
    runtime: Runtime,
    seed: int,
    label_smoothing: float = 0.0,
    set_train_mode: Callable[[], None] | None = None,
    on_epoch: Callable[[EpochResult], bool] | None = None,
    compile_model: bool = False,
) -> tuple[dict, list[EpochResult]]:
    """Train, validate each epoch, keep the best-by-val-accuracy (then val-loss) weights.

    set_train_mode re-applies the freezing policy (frozen parts stay in eval mode);
    on_epoch returns True to stop early (patience, or an Optuna prune that raises);
    compile_model runs the steps through torch.compile (the weights stay those of `model`);
    under fp16 autocast the loss is scaled (grad_scaler), so small gradients do not underflow.
    """
    forward = compiled(model, compile_model)
    scaler = grad_scaler(runtime)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    rng = np.random.default_rng(seed)
    views = train.views
    view_cycle = epoch_view_order(rng, len(train), views)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    history: list[EpochResult] = []
    best_key, best_state = None, None
    for epoch in range(1, epochs + 1):
        if set_train_mode is None:
            model.train()
        else:
            set_train_mode()
        order = rng.permutation(len(train))
        chosen_views = view_cycle[:, (epoch - 1) % views]
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)  # read once per epoch
        seen = 0
        for start in range(0, len(order), batch_size):
            interrupts.check()  # a safe point: between batches
            idx = order[start : start + batch_size]
            x = runtime.to_input(train.batch(idx, chosen_views[idx]))
            y = runtime.to_device(train.targets(idx))
            with runtime.autocast():
                loss = loss_fn(forward(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # unscales first; skips the step if a gradient is inf/nan
            scaler.update()
            total += loss.detach().double() * len(idx)
            seen += len(idx)
        scheduler.step()
        logits = predict_logits(forward, val, batch_size * 2, runtime)
        val_labels = val.labels.cpu()
        val_loss = nn.functional.cross_entropy(logits, val_labels).item()
        val_acc = (logits.argmax(1) == val_labels).float().mean().item()
        result = EpochResult(epoch, total.item() / max(seen, 1), val_loss, val_acc)
        history.append(result)
        key = (val_acc, -val_loss)
        if best_key is None or key > best_key:
            best_key = key
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if on_epoch is not None and on_epoch(result):
            break
    return best_state, history


def patience_stopper(patience: int) -> Callable[[EpochResult], bool]:
    """Stop when val loss has not improved for `patience` epochs ("to convergence")."""
    state = {"best": float("inf"), "since": 0}

    def should_stop(result: EpochResult) -> bool:
        if result.val_loss < state["best"] - 1e-4:
            state["best"], state["since"] = result.val_loss, 0
        else:
            state["since"] += 1
        return state["since"] >= patience

    return should_stop
