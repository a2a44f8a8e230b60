"""The machine's fast paths, chosen at run time: device, autocast dtype, memory format.

Same code on CPU and CUDA: CUDA when present; bf16 autocast where the hardware has it (CPUs
with AVX-512 BF16 or AMX, measured ~4.6x fp32 for EfficientNet-Lite0 here), fp16 AMP on older
GPUs, fp32 otherwise. channels_last everywhere: oneDNN and cuDNN both prefer it for convs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch

# deterministic cuBLAS; read when cuBLAS starts, so set before any CUDA work
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# a stage may keep this share of the free device memory resident (decoded images, cached
# activations); the rest is left for activations, gradients and other processes (workers)
RESIDENT_SHARE = 0.25
STAGING_BYTES = 256 * 2**20  # host slice per copy to a GPU (pinned on its way)


def host_available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU tensor to the device: pinned and non-blocking on CUDA (the copy overlaps the
        work already queued); a tensor already there is returned as is."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, channels_last when 4-D."""
        x = self.to_device(x)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def free_bytes(self) -> int:
        """Memory free for data on the device now: the GPU's free memory, or the host's
        available RAM on the CPU."""
        if self.device.type == "cuda":  # + what PyTorch's allocator keeps cached but no tensor uses
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return torch.cuda.mem_get_info(self.device)[0] + cached
        return host_available_bytes()

    def fits(self, nbytes: int, share: float = RESIDENT_SHARE) -> bool:
        """Whether nbytes may live on the device for a whole stage (a share of what is free)."""
        return nbytes <= share * self.free_bytes()

    def upload(self, array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """array[rows] as one tensor on the device, copied in slices of at most STAGING_BYTES,
        so a memory-mapped array is never read into host memory whole on its way to a GPU."""
        row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(array[rows]))
        dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype  # (a read-only memmap's slice would warn)
        out = torch.empty((len(rows), *array.shape[1:]), dtype=dtype, device=self.device)
        step = max(1, STAGING_BYTES // row_bytes)
        for start in range(0, len(rows), step):
            piece = torch.from_numpy(np.ascontiguousarray(array[rows[start : start + step]]))
            # straight into its place: no second slice-sized buffer on the GPU
            out[start : start + step].copy_(piece.pin_memory(), non_blocking=True)
        return out

    def as_float32(self, array: np.ndarray) -> torch.Tensor:
        """A whole array as float32 on the device: to a GPU in staged slices (no pinned copy of
        all of it, which can be gigabytes); on the CPU sharing the array's memory where it is
        float32 and contiguous already (so callers must not write to it)."""
        array = np.ascontiguousarray(array, np.float32)
        if self.device.type == "cuda":
            return self.upload(array, np.arange(len(array)))
        return torch.from_numpy(array)

    def inference_batch_size(self, configured: int | str) -> int:
        """extract/evaluate batch size: the configured number, or for `auto` one that fills the
        device. It changes speed, and results only in the last bits (kernels are chosen per
        shape). On CUDA 256 images per 16 GiB of memory (1,024 on an H200); 64 on the CPU,
        where larger batches measured no faster here."""
        if configured != "auto":
            return int(configured)
        if self.device.type != "cuda":
            return 64
        total_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        return int(min(1024, max(64, 256 * (total_gib // 16))))


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile(model) when enabled: same weights, fused kernels after a compile per new
    input shape and train/eval mode (tens of seconds on a small CPU), else the model itself."""
    if not enabled:
        return model
    # trials of different k share TopModel.forward: room for each k's train and eval graphs
    # (torch 2.6 knows the limit only by its old name)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(model)


def device_name(device: torch.device) -> str:
    """The device in words, for logs and run tags: `cpu`, or `cuda (NVIDIA H200)`; on a machine
    whose GPUs are split between processes, also the one this process was given."""
    if device.type != "cuda":
        return "cpu"
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda ({torch.cuda.get_device_name(device)}{f', CUDA_VISIBLE_DEVICES={given}' if given else ''})"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES would name them to a child
    (its own entries, indices or UUIDs, where it is set); none when the run is on the CPU."""
    if os.environ.get("PIPELINE_DEVICE") == "cpu" or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    # CUDA ignores the entries from the first one it cannot use: device_count() says how many it kept
    return [name.strip() for name in listed.split(",")][:count]


@dataclass(frozen=True)
class WorkerSlot:
    """Where one of a machine's local finetune processes runs."""

    gpu: str | None  # its CUDA_VISIBLE_DEVICES entry; None: the device this process would pick
    sharing: int  # how many of the processes share that device (each keeps a share of its memory)


def worker_slots(workers: int, gpus: list[str]) -> list[WorkerSlot]:
    """Slot p for process p of `workers` (0 is finetune itself): on a machine with several GPUs,
    process p runs on GPU p mod their count, so the workers spread over every GPU rather than
    queue on the first; on one GPU or the CPU they all share the one device."""
    if len(gpus) <= 1:
        return [WorkerSlot(None, workers)] * workers
    on_gpu = [len(range(g, workers, len(gpus))) for g in range(len(gpus))]
    return [WorkerSlot(gpus[p % len(gpus)], on_gpu[p % len(gpus)]) for p in range(workers)]


def cpu_has_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cuda_amp_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 autocast on GPUs that compute it natively (compute capability 8.0, Ampere, and
    later), else fp16 with loss scaling. torch.cuda.is_bf16_supported() also says yes where bf16
    is only emulated (V100, T4), and there cuDNN has no bf16 convolutions: slow kernels."""
    return torch.bfloat16 if capability[0] >= 8 else torch.float16


def select_runtime(precision: str = "auto", training: bool = False) -> Runtime:
    """precision: auto | fp32 | bf16 | fp16. PIPELINE_DEVICE=cpu forces the CPU.

    auto for *training* on the CPU is fp32: measured here, bf16 autocast made the backward of
    EfficientNet's depthwise blocks 2.6x slower (60 vs 157 img/s for the top 3 blocks), while
    for inference it is 4.6x faster.
    """
    forced = os.environ.get("PIPELINE_DEVICE")
    use_cuda = torch.cuda.is_available() and forced != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    if precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        dtype = torch.float16
    elif use_cuda:
        dtype = cuda_amp_dtype(torch.cuda.get_device_capability(device))
    elif training:
        dtype = None
    else:
        dtype = torch.bfloat16 if cpu_has_bf16() else None
    return Runtime(device=device, amp_dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed every generator and ask for deterministic kernels. On CPU this makes a stage
    bit-reproducible; on CUDA some kernels have no deterministic version (PyTorch warns, and
    results can differ in the last bits between runs)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
