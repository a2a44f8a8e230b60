"""ONNX export of a checkpoint, its preprocessing and temperature inside the graph, refused unless
onnxruntime measurably agrees with the PyTorch model.

The graph takes what data.images.fit_to_square gives: `images` (B, S, S, 3) uint8 RGB at the
working size, any batch, and returns `probabilities` (B, classes) float32 = softmax(logits /
temperature). What a client must do before that (the square crop) and everything it needs to
know (size, mean/std, layout, classes, temperature) is in the file's metadata_props, so serving
it takes onnxruntime, numpy and Pillow only (README: "Without this package: ONNX").
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_path, write_json
from pipeline.devices import Runtime
from pipeline.errors import PipelineError
from pipeline.model.backbones import normalize
from pipeline.model.checkpoints import load_classifier, read_config
from pipeline.serving.classifier import ImageClassifier, temperature_of

ONNX_FILE = "model.onnx"
PARITY_FILE = "onnx_parity.json"  # written next to the .onnx file
INPUT, OUTPUT = "images", "probabilities"
MIN_AGREEMENT = 0.999  # top-1 agreement with PyTorch below this and the export is refused
FP32_CPU = Runtime(torch.device("cpu"), None)  # the parity reference: see measure_parity
OPSET = 17  # not the newest on purpose: older onnxruntime builds (mobile, other languages) run it too
PREPROCESSING = ("before the graph: EXIF orientation, RGB (alpha composited on white), centre crop to a square "
                 "and bicubic resize to image_size (PIL ImageOps.fit); in the graph: /255, (x - mean) / std, "
                 "NHWC to NCHW")


class ServingGraph(nn.Module):
    """The classifier with serving's normalisation in front and its softmax behind, so a client
    of the ONNX file cannot get either wrong."""

    def __init__(self, model: nn.Module, input_config: dict, temperature: float):
        super().__init__()
        self.model = model
        self.input_config = input_config
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, S, S, 3) uint8 → (B, classes)
        logits = self.model(normalize(images, self.input_config))  # the very function serving uses
        return torch.softmax(logits.float() / self.temperature, dim=1)


def metadata(config: dict) -> dict[str, str]:
    """The ONNX metadata_props (strings only): how to feed the graph and read its output."""
    return {
        "input": INPUT,
        "output": OUTPUT,
        "image_size": str(config["image_size"]),
        "layout": "NHWC",
        "dtype": "uint8",
        "channel_order": "RGB",
        "preprocessing": PREPROCESSING,
        "mean": json.dumps(config["input_config"]["mean"]),
        "std": json.dumps(config["input_config"]["std"]),
        "classes": json.dumps(config["classes"]),
        "temperature": repr(temperature_of(config)),
        "backbone": config["backbone"],
    }


def export(checkpoint_dir: Path, target: Path) -> None:
    """Write the checkpoint's model as an ONNX file with a dynamic batch axis and its metadata."""
    import onnx

    model, config = load_classifier(checkpoint_dir)
    graph = ServingGraph(model, config["input_config"], temperature_of(config)).eval()
    size = config["image_size"]
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: nothing batch-1 specific is traced
    # dynamo=False, the TorchScript exporter: measured here (torch 2.14) it exports EfficientNet-Lite0 at
    # 64 px in 1-2 s against ~12 s for dynamo=True, which also needs onnxscript and, in one try here, wrote
    # a graph onnxruntime refused (duplicate names) unless its optimize pass ran. It is deprecated and warns
    # on every call (silenced); if a later torch drops it, this call fails and dynamo=True is the way.
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(target), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    proto = onnx.load(str(target))
    onnx.helper.set_model_props(proto, metadata(config))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


def onnx_probabilities(onnx_path: Path, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, classes) probabilities from onnxruntime, in batches of any size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    chunks = [session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels[start : start + batch_size])})[0]
              for start in range(0, len(pixels), batch_size)]
    return np.concatenate(chunks)


@dataclass(frozen=True)
class Parity:
    """onnxruntime against the PyTorch model (ImageClassifier.probabilities, fp32 CPU) on the same pixels."""

    images: int
    top1_agreement: float
    max_abs_probability_diff: float
    min_agreement: float
    export_seconds: float
    check_seconds: float
    onnx_sha256: str
    reference: str = "ImageClassifier.probabilities, fp32 on the CPU"

    @property
    def passed(self) -> bool:  # a NaN in the output agrees with nothing, whatever argmax makes of it
        return self.top1_agreement >= self.min_agreement and math.isfinite(self.max_abs_probability_diff)

    def summary(self) -> str:
        return (f"ONNX parity: top-1 agreement {self.top1_agreement:.2%} with PyTorch on {self.images} images, "
                f"max |Δp| {self.max_abs_probability_diff:.1e}")

    def tags(self) -> dict[str, str]:
        """For the registered version: its ONNX file's figures, readable in the registry UI."""
        return {"onnx.parity": self.summary(), "onnx.top1_agreement": str(self.top1_agreement),
                "onnx.max_abs_prob_diff": str(self.max_abs_probability_diff), "onnx.test_images": str(self.images)}

    def metrics(self) -> dict[str, float]:
        return {"onnx_top1_agreement": self.top1_agreement,
                "onnx_max_abs_prob_diff": self.max_abs_probability_diff}


def measure_parity(onnx_path: Path, checkpoint_dir: Path, pixels: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |Δ probability|) of the ONNX file against the checkpoint's PyTorch model.

    The reference runs on the CPU in fp32, as onnxruntime runs the graph: under serving's bf16
    autocast (or TF32 convolutions on a GPU) the figures would measure that rounding, and the
    near-ties it flips, not the export.
    """
    reference = ImageClassifier(checkpoint_dir, FP32_CPU).probabilities(pixels)
    exported = onnx_probabilities(onnx_path, pixels)
    agreement = float((reference.argmax(axis=1) == exported.argmax(axis=1)).mean())
    return agreement, float(np.abs(reference - exported).max())


def check_pixels(pixels: np.ndarray, size: int) -> None:
    if len(pixels) == 0:
        raise PipelineError("no images to check the ONNX export on — give --images with a folder of images")
    if pixels.shape[1:] != (size, size, 3):
        raise PipelineError(f"parity images are {pixels.shape[1:]} but the model takes ({size}, {size}, 3) — "
                            "give --images with image files, or export the model of this project")


def export_checked(checkpoint_dir: Path, target: Path, pixels: np.ndarray,
                   min_agreement: float = MIN_AGREEMENT) -> Parity:
    """Export, measure parity on `pixels` (N, S, S, 3) uint8, and write the parity figures next to
    `target`. Below min_agreement it raises, and `target` is left as it was: no file that
    disagrees with the model ever stands where a client looks for the model."""
    checkpoint_dir, target = Path(checkpoint_dir), Path(target)
    check_pixels(pixels, read_config(checkpoint_dir)["image_size"])
    with atomic_path(target) as tmp:
        started = time.perf_counter()
        export(checkpoint_dir, tmp)
        exported = time.perf_counter()
        agreement, max_diff = measure_parity(tmp, checkpoint_dir, pixels)
        parity = Parity(len(pixels), agreement, max_diff, min_agreement, round(exported - started, 3),
                        round(time.perf_counter() - exported, 3), hashlib.sha256(tmp.read_bytes()).hexdigest())
        write_json(target.with_name(PARITY_FILE), {**asdict(parity), "passed": parity.passed})
        if not parity.passed:
            raise PipelineError(
                f"ONNX export refused: {parity.summary()}, needs at least {min_agreement:.1%} — the exported graph "
                f"computes something else than the checkpoint, so {target} was not written; see "
                f"{target.with_name(PARITY_FILE)} and retry with another torch/onnxruntime version")
    return parity
