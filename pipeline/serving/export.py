"""`python -m pipeline export`: write a model (by default this project's shipped one) as ONNX,
checked for parity on the held-out test images or on a folder of images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.data import holdout
from pipeline.data.images import DEFAULT_MAX_IMAGE_PIXELS, UnusableImage, decode_image
from pipeline.errors import PipelineError
from pipeline.model.checkpoints import read_config
from pipeline.progress import say
from pipeline.serving.onnx_export import ONNX_FILE, PARITY_FILE, export_checked
from pipeline.serving.predict import checkpoint_folder, collect

# Not in paths.py: every stage lists that file as a dep, and this is no stage's output.
DEFAULT_OUT = Path("models/onnx") / ONNX_FILE
SHIPPED_DIRS = {"finetuned": paths.FINETUNED_DIR, "head_only": paths.HEAD_DIR}  # selection.json's "shipped"


def shipped_checkpoint() -> Path:
    """The checkpoint finetune chose to ship; a head-only one is assembled with its backbone on load."""
    if not paths.SELECTION.is_file():
        raise PipelineError(f"{paths.SELECTION} is missing — run `dvc repro` here (finetune picks the model "
                            "that ships), or give --model")
    return SHIPPED_DIRS[json.loads(paths.SELECTION.read_text())["shipped"]]


def folder_pixels(folder: Path, size: int, max_pixels: int) -> np.ndarray:
    """(N, S, S, 3) uint8 of every readable image under `folder`, decoded as serving decodes."""
    pixels = []
    for path in collect([folder]):
        try:
            pixels.append(decode_image(path.read_bytes(), size, max_pixels).pixels)
        except (UnusableImage, OSError):
            continue  # predict reports unreadable files; here they just are not checked
    return np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)


def parity_pixels(images: Path | None, config: dict) -> np.ndarray:
    size = config["image_size"]
    if images is not None:
        return folder_pixels(images, size, int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)))
    if not paths.MANIFEST.is_file():
        raise PipelineError(f"{paths.MANIFEST} is missing, so there are no test images to check the export "
                            "on — give --images with a folder of images, or run `dvc repro` here")
    return holdout.load()[1]


def main(model: str | None, out: Path, images: Path | None) -> None:
    folder = checkpoint_folder(model) if model else shipped_checkpoint()
    parity = export_checked(folder, out, parity_pixels(images, read_config(folder)))
    say(f"export: {out} ({out.stat().st_size / 2**20:.1f} MiB) from {model or folder}, exported in "
        f"{parity.export_seconds:.1f} s\nexport: {parity.summary()}, checked in {parity.check_seconds:.1f} s — "
        f"figures in {out.with_name(PARITY_FILE)}")
