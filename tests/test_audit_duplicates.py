"""Near-duplicate pairs computed block by block on the device are the pairs of the whole cosine
matrix: none lost or doubled at a block's edge, none on or below the diagonal."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.audit import duplicates
from pipeline.devices import Runtime

CPU = Runtime(torch.device("cpu"), None)


def test_blocked_pairs_are_the_pairs_of_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(60, 32)).astype(np.float16)  # the cache's dtype
    copies = {(3, 41): 0.02, (10, 11): 0.05, (20, 59): 0.1, (6, 7): 0.03, (0, 13): 0.01}
    for (original, copy), noise in copies.items():  # near copies, some across the blocks of 7 rows
        pooled[copy] = pooled[original] + noise * rng.normal(size=32)
    x = pooled.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = unit @ unit.T
    expected = [(i, j) for i in range(60) for j in range(i + 1, 60) if cosine[i, j] >= 0.93]
    assert sorted(expected) == sorted(copies)  # the planted pairs, and only they, are near-duplicates

    monkeypatch.setattr(duplicates, "BLOCK", 7)
    found = duplicates.near_duplicate_pairs(pooled, 0.93, CPU)
    assert [(i, j) for i, j, _ in found] == sorted(copies)
    assert all(abs(sim - cosine[i, j]) < 1e-3 for i, j, sim in found)
