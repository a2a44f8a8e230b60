"""The registered model: an MLflow pyfunc that takes images and returns labels and probabilities.

Logged as "models from code" (pyfunc.py), with the checkpoint folder as an artifact and
this package as code, so loading it unpickles nothing.
Inputs: a DataFrame whose `image` column holds encoded image bytes or base64 strings, or a
uint8 array (B, H, W, 3) / (H, W, 3) from Python (4 channels: RGBA, composited on white).
Every input goes through the preprocessing training used (data.images.fit_to_square), and
encoded images are decoded under the cap training used (model.json's max_image_pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import interrupts
from pipeline.data.images import DEFAULT_MAX_IMAGE_PIXELS, UnusableImage, decode_image, fit_to_square
from pipeline.devices import Runtime, select_runtime
from pipeline.errors import PipelineError
from pipeline.model.backbones import normalize
from pipeline.model.checkpoints import load_classifier

IMAGE_COLUMN = "image"
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
PIP_REQUIREMENTS = [  # explicit: MLflow's inference of them costs ~15 s per log
    f"torch=={torch.__version__.split('+')[0]}",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
]


def image_bytes(value) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise PipelineError("image column: a string must be base64-encoded image bytes") from None
    raise PipelineError(f"image column: expected bytes or a base64 string, got {type(value).__name__}")


def temperature_of(config: dict) -> float:
    """model.json's temperature (evaluate fits it on the validation images); 1.0 for a checkpoint
    no calibration wrote one into. The pyfunc and the ONNX graph both divide the logits by it."""
    return float(config.get("temperature", 1.0))


class ImageClassifier:
    """Plain object so predict/tests can use it without MLflow; the pyfunc wraps it."""

    def __init__(self, checkpoint_dir: Path, runtime: Runtime | None = None):
        """runtime: where and in what precision to run (default: this machine's fastest); the ONNX
        parity check asks for the CPU in fp32, as onnxruntime runs the export."""
        self.model, self.config = load_classifier(Path(checkpoint_dir))
        self.classes = self.config["classes"]
        self.size = self.config["image_size"]
        # the decompression-bomb cap prepare used; older checkpoints predate the key
        self.max_pixels = int(self.config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        self.runtime = runtime or select_runtime("auto")
        self.temperature = temperature_of(self.config)
        self.model = self.model.to(self.runtime.device).to(memory_format=torch.channels_last)

    def pixels_from(self, model_input) -> np.ndarray:
        """Any accepted input → (B, S, S, 3) uint8 at the model's working size."""
        if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
            if model_input.ndim not in (3, 4) or model_input.shape[-1] not in (3, 4):
                raise PipelineError(
                    f"a uint8 array input must be (H, W, 3) or (B, H, W, 3), got {model_input.shape}"
                )
            batch = model_input[None] if model_input.ndim == 3 else model_input
            out = [fit_to_square(Image.fromarray(np.ascontiguousarray(img)), self.size) for img in batch]
            return np.stack(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise PipelineError(f"input needs a column named {IMAGE_COLUMN!r}")
            values = model_input[IMAGE_COLUMN].tolist()
        else:
            values = list(model_input)
        out = []
        for value in values:
            try:
                out.append(decode_image(image_bytes(value), self.size, self.max_pixels).pixels)
            except UnusableImage as exc:
                raise PipelineError(f"cannot read an input image: {exc}") from None
        return np.stack(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray, batch_size: int | str = "auto") -> np.ndarray:
        """(B, classes) calibrated probabilities; uint8 batches go to the device and come back
        as one array (no copy back per batch)."""
        size = self.runtime.inference_batch_size(batch_size)
        chunks = []
        for start in range(0, len(pixels), size):
            interrupts.check()  # a safe point between batches (evaluate scores the whole test split)
            batch = self.runtime.to_device(torch.from_numpy(np.ascontiguousarray(pixels[start : start + size])))
            x = self.runtime.to_input(normalize(batch, self.config["input_config"]))
            with self.runtime.autocast():
                logits = self.model(x)
            chunks.append(torch.softmax(logits.float() / self.temperature, dim=1))
        return torch.cat(chunks).cpu().numpy() if chunks else np.zeros((0, len(self.classes)))

    def predict(self, model_input) -> pd.DataFrame:
        probs = self.probabilities(self.pixels_from(model_input))
        best = probs.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.classes[i] for i in best],
            "probability": probs[np.arange(len(best)), best].astype(float),
            "probabilities": [p.astype(float).tolist() for p in probs],
        })


def input_example(image: bytes) -> pd.DataFrame:
    """The pyfunc's input for one encoded image: a DataFrame with a base64 `image` column."""
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(image).decode()]})


def to_png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
