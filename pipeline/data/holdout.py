"""What later stages read of prepare's outputs: the test split (manifest rows and decoded
pixels) and the hash that names the prepared data."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from pipeline import paths


def load(split: str = "test") -> tuple[pd.DataFrame, np.ndarray]:
    """(the split's rows of the manifest in file order, their (N, S, S, 3) uint8 pixels)."""
    manifest = pd.read_csv(paths.MANIFEST)
    rows = manifest[manifest.split == split].reset_index(drop=True)
    images = np.load(paths.IMAGES, mmap_mode="r")
    return rows, np.asarray(images[rows["index"].to_numpy()])


def split_hash(test: pd.DataFrame) -> str:
    """Names the test split by its content: equal hashes mean the same test images."""
    return hashlib.sha256("\n".join(sorted(test.sha256)).encode()).hexdigest()[:16]


def data_hash() -> str:
    """The prepared data's content hash (names the Optuna study, tags the registry version)."""
    return json.loads(paths.CLASSES.read_text())["data_hash"]
