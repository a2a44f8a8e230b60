"""The audit's torch logistic regression solves scikit-learn's problem: same C, same
standardisation, so the probabilities it gives are those of sklearn's fit at the optimum."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.audit import logistic
from pipeline.devices import Runtime

CPU = Runtime(torch.device("cpu"), None)


def noisy_blobs(n: int = 600, dim: int = 20, classes: int = 4, seed: int = 0):
    """Overlapping Gaussian classes on features of very different scales, one of them constant."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    x = (centres[y] + 1.5 * rng.normal(size=(n, dim))) * rng.uniform(0.01, 100, dim)
    x[:, 3] = 7.0
    return x.astype(np.float32), y


def test_the_fit_reaches_sklearns_optimum_for_the_same_c():
    x, y = noisy_blobs()
    held_out, fitted = slice(0, 100), slice(100, None)
    for c in (0.003, 0.1):
        reference = make_pipeline(StandardScaler(), LogisticRegression(C=c, tol=1e-10, max_iter=10_000))
        expected = reference.fit(x[fitted].astype(np.float64), y[fitted]).predict_proba(x[held_out])
        model = logistic.fit(x[fitted], y[fitted], 4, c, CPU)
        got = model.probabilities(x[held_out], CPU)
        assert np.abs(got - expected).max() < 1e-3, (c, np.abs(got - expected).max())
        assert 0 < model.iterations < logistic.MAX_ITERATIONS  # converged, not cut off


def test_the_fit_is_exactly_repeatable():
    x, y = noisy_blobs(seed=1)
    first, second = (logistic.fit(x, y, 4, 0.01, CPU).probabilities(x, CPU) for _ in range(2))
    assert np.array_equal(first, second)
