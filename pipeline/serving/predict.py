"""`python -m pipeline predict`: label image files/folders with a registered model or checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import UnusableImage, decode_image
from pipeline.errors import PipelineError
from pipeline.progress import bar
from pipeline.serving.classifier import ImageClassifier
from pipeline.tracking import store

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def collect(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise PipelineError(f"{path} does not exist — give image files or folders")
    return files


def load(model: str) -> ImageClassifier:
    """A checkpoint folder, or an MLflow model URI whose artifacts hold one."""
    return ImageClassifier(checkpoint_folder(model))


def checkpoint_folder(model: str) -> Path:
    """The checkpoint folder itself, or the one inside a downloaded MLflow model URI's artifacts."""
    if Path(model).is_dir():
        return Path(model)
    import mlflow

    store.setup_uri()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as exc:
        raise PipelineError(f"cannot load model {model} ({type(exc).__name__}: {exc})") from None
    found = list(local.rglob("model.json"))
    if not found:
        raise PipelineError(f"{model} holds no pipeline checkpoint (model.json)")
    return found[0].parent


def main(model: str, paths: list[Path], output: Path | None, batch_size: int = 64) -> None:
    classifier = load(model)
    files = collect(paths)
    rows = []
    with bar(len(files), "predict") as progress:
        for start in range(0, len(files), batch_size):
            chunk, pixels = files[start : start + batch_size], []
            readable = []
            for path in chunk:
                try:
                    pixels.append(decode_image(path.read_bytes(), classifier.size,
                                               classifier.max_pixels).pixels)
                    readable.append(path)
                except (UnusableImage, OSError) as exc:
                    rows.append({"path": str(path), "label": "", "probability": np.nan,
                                 "error": str(exc)})
            if pixels:
                probs = classifier.probabilities(np.stack(pixels))
                for path, p in zip(readable, probs, strict=True):
                    best = int(p.argmax())
                    rows.append({"path": str(path), "label": classifier.classes[best],
                                 "probability": float(p[best]), "error": ""})
            progress.update(len(chunk))
    table = pd.DataFrame(rows, columns=["path", "label", "probability", "error"])
    table.to_csv(output if output else sys.stdout, index=False)
