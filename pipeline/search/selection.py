"""Pure: which fine-tuning configuration to keep, and whether it ships instead of the head-only model.

A study's best trial is the maximum of ~10 noisy scores on a small validation split: a lucky
seed as often as a good configuration. So the top few configurations are trained again with
fresh seeds and ranked by their *mean* validation accuracy; those validation cannot tell apart
from the best ship together as an ensemble, and the fine-tuned model must then
beat the head-only model (feature extraction, the baseline the pipeline already has) on the
same validation images by a one-sided exact McNemar test — or the head-only model ships.
Nothing here sees the test split: evaluate only reports on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.tracking.gate import mcnemar_exact_p

FINETUNED = "finetuned"
HEAD_ONLY = "head_only"


@dataclass
class Candidate:
    """One configuration of the study, trained with several seeds (its own trial first)."""

    slot: int  # the study trial it came from
    params: dict
    val_accuracies: list[float] = field(default_factory=list)

    @property
    def mean_val_accuracy(self) -> float:
        return float(np.mean(self.val_accuracies))


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best mean validation accuracy first; ties go to the earlier trial."""
    return sorted(candidates, key=lambda c: (-c.mean_val_accuracy, c.slot))


def indistinguishable_from_best(ranked: list[Candidate], n_val: int) -> list[Candidate]:
    """The ranked candidates that train the best one's k and whose mean validation accuracy is
    within one binomial standard error of the best's: validation cannot tell them apart, so
    they all go into the shipped ensemble rather than letting float noise pick one of them."""
    best = ranked[0]
    p = best.mean_val_accuracy
    tolerance = float(np.sqrt(p * (1 - p) / n_val)) if n_val else 0.0
    return [c for c in ranked
            if c.params["k"] == best.params["k"] and best.mean_val_accuracy - c.mean_val_accuracy <= tolerance]


@dataclass(frozen=True)
class ShipDecision:
    shipped: str  # FINETUNED or HEAD_ONLY
    reason: str
    n: int  # validation images both models were scored on
    finetuned_val_accuracy: float
    head_only_val_accuracy: float
    only_finetuned_right: int
    only_head_only_right: int
    p_value: float
    significance: float


def decide_shipping(finetuned_correct: np.ndarray, head_only_correct: np.ndarray,
                    significance: float) -> ShipDecision:
    """Per-image correctness of both models on the validation split → which one ships."""
    finetuned = np.asarray(finetuned_correct, dtype=bool)
    head_only = np.asarray(head_only_correct, dtype=bool)
    if finetuned.shape != head_only.shape or not len(finetuned):
        raise ValueError("both models must be scored on the same, non-empty validation images")
    b = int((finetuned & ~head_only).sum())
    c = int((~finetuned & head_only).sum())
    p = mcnemar_exact_p(b, c)
    ft_acc, head_acc = float(finetuned.mean()), float(head_only.mean())
    if p < significance:
        shipped = FINETUNED
        reason = (f"fine-tuned is significantly better on validation ({ft_acc:.4f} vs {head_acc:.4f}, "
                  f"one-sided exact McNemar p={p:.3g} < {significance})")
    else:
        shipped = HEAD_ONLY
        reason = (f"fine-tuned is not significantly better on validation ({ft_acc:.4f} vs {head_acc:.4f}, "
                  f"p={p:.3g} >= {significance}): the head-only model ships")
    return ShipDecision(shipped, reason, len(finetuned), ft_acc, head_acc, b, c, p, significance)
