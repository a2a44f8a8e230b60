"""Near-duplicate images: pairs whose pooled backbone features point the same way.

Exact copies never get here (prepare keeps one of same-bytes files). Near-duplicates — a
re-encoded, resized or brightened copy — are what inflates a test score when one of the pair
is in train and the other in test. Measured on the built-in data: distinct images reach a cosine
of 0.90 at most; a 0.8x resize or a 10% brightening of the same image stays above 0.94.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline import interrupts
from pipeline.devices import Runtime

BLOCK = 1024  # rows of the similarity matrix computed at a time (memory ~ BLOCK x N)


def near_duplicate_pairs(pooled: np.ndarray, threshold: float, runtime: Runtime) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine >= threshold, in row order; pooled is (N, D).

    All N^2 similarities are computed, block by block on the device (quadratic in N: the part of
    the audit that grows fastest with the data); only the pairs above the threshold leave it."""
    features = runtime.as_float32(pooled)
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    pairs = []
    for start in range(0, len(unit), BLOCK):
        interrupts.check()
        sims = unit[start:start + BLOCK] @ unit.T
        rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
        above_diagonal = cols > rows + start
        rows, cols = rows[above_diagonal], cols[above_diagonal]
        values = sims[rows, cols].tolist()
        pairs += [(start + r, c, v) for r, c, v in zip(rows.tolist(), cols.tolist(), values, strict=True)]
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
