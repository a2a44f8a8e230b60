"""Near-duplicate images: pairs whose pooled backbone features point the same way.

Exact copies never get here (prepare keeps one of same-bytes files). Near-duplicates — a
re-encoded, resized or brightened copy — are what inflates a test score when one of the pair
is in train and the other in test. Measured on the built-in data: distinct images reach a cosine
of 0.90 at most; a 0.8x resize or a 10% brightening of the same image stays above 0.94.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import interrupts

BLOCK = 1024  # rows of the similarity matrix computed at a time (memory ~ BLOCK x N)


def near_duplicate_pairs(pooled: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine >= threshold; pooled is (N, D)."""
    unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(unit), BLOCK):
        interrupts.check()
        sims = unit[start:start + BLOCK] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows, cols, strict=True):
            i = start + int(r)
            if int(c) > i:
                pairs.append((i, int(c), float(sims[r, c])))
    return pairs


def pair_table(pairs: list[tuple[int, int, float]], images: pd.DataFrame) -> pd.DataFrame:
    """One row per pair, naming both images; `images` has path, label and split per position.
    Cross-split pairs (leakage) first, then by similarity."""
    columns = ["path_a", "label_a", "split_a", "path_b", "label_b", "split_b", "similarity", "cross_split"]
    rows = []
    for i, j, sim in pairs:
        a, b = images.iloc[i], images.iloc[j]
        rows.append([a.path, a.label, a.split, b.path, b.label, b.split, round(sim, 6), a.split != b.split])
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["cross_split", "similarity"], ascending=[False, False], kind="stable",
                             ignore_index=True)
