"""Suspected label errors: out-of-fold probabilities from a linear model on cached features, fed to
cleanlab's confident learning (Northcutt et al., 2021).

Out-of-fold, so each image is scored by a model that never saw its (possibly wrong) label. The
model is a logistic regression (pipeline.audit.logistic, on the run's device) on the mean-pooled
activation at every cached cut: on the built-in data these multi-level features reach 0.75
out-of-fold accuracy where the final pooled features reach 0.65 (measured), and confident
learning is only as sharp as the model under it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from pipeline import interrupts, paths
from pipeline.audit import logistic
from pipeline.devices import Runtime

CHUNK = 256  # rows of cut activations averaged at a time: the cache can exceed memory


def audit_features(split: str, cache_blocks: int) -> np.ndarray:
    """(N, V, D) float32: the spatial mean of each cached cut's activations, concatenated
    (the final pooled features when nothing below the top is cached)."""
    if cache_blocks == 0:
        return np.load(paths.pooled_features(split)).astype(np.float32)
    parts = []
    for k in range(1, cache_blocks + 1):
        cut = np.load(paths.cut_activations(split, k), mmap_mode="r")  # (N, V, C, H, W)
        pooled = np.empty(cut.shape[:3], np.float32)
        for start in range(0, len(cut), CHUNK):
            interrupts.check()
            pooled[start:start + CHUNK] = cut[start:start + CHUNK].astype(np.float32).mean(axis=(3, 4))
        parts.append(pooled)
    return np.concatenate(parts, axis=2)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                              regularization: float, seed: int, runtime: Runtime) -> np.ndarray:
    """(N, classes): each image's probabilities from a model fitted on the other folds.

    Trains on every cached view of the fold's images (augmentation) and averages the predictions
    over the held-out images' views.
    """
    n, views, dim = features.shape
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    folds = max(2, min(folds, smallest))  # stratification needs each class in every fold
    probs = np.zeros((n, num_classes))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's "least populated class" notice for tiny classes
        fold_rows = list(splitter.split(np.zeros(n), labels))
    for fit_rows, held_out in fold_rows:
        model = logistic.fit(features[fit_rows].reshape(-1, dim), np.repeat(labels[fit_rows], views),
                             num_classes, regularization, runtime)
        for view in range(views):
            probs[held_out] += model.probabilities(features[held_out, view], runtime) / views
    return probs


@dataclass
class LabelIssues:
    flagged: np.ndarray  # (M,) positions into the audited images, most suspect first
    quality: np.ndarray  # (N,) cleanlab's label quality score of every image (low = suspect)
    suggested: np.ndarray  # (N,) the out-of-fold model's class
    estimated_noise_rate: float  # flagged fraction: confident learning's estimate of the noise


def find_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> LabelIssues:
    flagged = find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence",
                                n_jobs=1)  # n_jobs=1: deterministic, and the data are small
    quality = get_label_quality_scores(labels, probs)
    noise_rate = len(flagged) / max(len(labels), 1)
    return LabelIssues(np.asarray(flagged, dtype=int), quality, probs.argmax(axis=1), noise_rate)
