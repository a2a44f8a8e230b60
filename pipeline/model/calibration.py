"""Temperature scaling (Guo et al., 2017) and the measures of calibration the report shows.

One scalar T > 0 is fitted on validation logits so that softmax(logits / T) is calibrated, then
applied unchanged to the test split. Dividing by T never reorders a row, so the predicted
classes, and with them accuracy, are exactly those of the uncalibrated model.

Everything here is float64 numpy on (N, C) arrays (torch tensors are accepted and converted):
the math never touches disk, MLflow or params.yaml. Log-probabilities are valid logits (softmax
of log p is p), so an ensemble's output, or `logits_from_probabilities` of what a classifier
returns, can be calibrated too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

DEFAULT_BINS = 15  # Guo et al.'s choice; the reliability diagram uses the same bins
# T outside this is a sign of a degenerate fit (e.g. a validation set the model gets 100% right
# with margin wants T -> 0), not of a model that needs it
TEMPERATURE_RANGE = (0.05, 20.0)
PROBABILITY_FLOOR = 1e-12  # log(0) would be -inf: a probability a float32 softmax rounded to 0


def _array(values, dtype=np.float64) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a device or in bf16
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = _array(scores), _array(labels, np.int64)
    if scores.ndim != 2 or labels.shape != (len(scores),) or len(scores) == 0:
        raise ValueError(f"need (N, C) scores and (N,) labels with N > 0, got {scores.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must be class indices in 0..{scores.shape[1] - 1}")
    return scores, labels


def logits_from_probabilities(probs) -> np.ndarray:
    """(N, C) probabilities → logits whose softmax is the same probabilities."""
    return np.log(np.clip(_array(probs), PROBABILITY_FLOOR, None))


def calibrated_probabilities(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T), (N, C)."""
    return softmax(_array(logits) / temperature, axis=1)


def _nll_of_logits(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    # log_softmax, not log(softmax): exact for the confident rows that matter most here
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on these (validation) rows.

    The NLL is convex in 1/T, so unimodal in log T: a bounded Brent search over log T finds its
    minimum, deterministically and without a starting point or learning rate to tune (LBFGS on
    T needs both and can step to T <= 0).
    """
    logits, labels = _checked(logits, labels)
    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: _nll_of_logits(logits, labels, float(np.exp(log_t))),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(np.clip(np.exp(result.x), *TEMPERATURE_RANGE))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    probs, labels = _checked(probs, labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], PROBABILITY_FLOOR, None)).mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-1 confidence in equal-width bins on [0, 1]: bin i holds edges[i] < confidence <= edges[i+1]."""

    edges: np.ndarray  # (bins + 1,)
    count: np.ndarray  # (bins,) images per bin
    confidence: np.ndarray  # (bins,) mean top-1 probability; NaN for an empty bin
    accuracy: np.ndarray  # (bins,) fraction whose top-1 class is right; NaN for an empty bin

    @property
    def ece(self) -> float:
        """Σ_b (n_b / N) |accuracy_b − confidence_b|; empty bins weigh nothing."""
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.count[filled] * gaps).sum() / self.count.sum())

    def rows(self) -> list[dict]:
        """JSON-ready, one dict per bin (DVC plots, metrics); an empty bin's means are null."""
        def value(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return [{"lower": float(self.edges[i]), "upper": float(self.edges[i + 1]), "count": int(self.count[i]),
                 "confidence": value(self.confidence[i]), "accuracy": value(self.accuracy[i])}
                for i in range(len(self.count))]


def reliability_bins(probs, labels, bins: int = DEFAULT_BINS) -> ReliabilityBins:
    probs, labels = _checked(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # side="left" puts a confidence equal to an edge in the bin below it, as (lower, upper] says
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return ReliabilityBins(edges, count, mean_confidence, accuracy)


def expected_calibration_error(probs, labels, bins: int = DEFAULT_BINS) -> float:
    """ECE with equal-width bins over top-1 confidence (Guo et al., 2017; Naeini et al., 2015)."""
    return reliability_bins(probs, labels, bins).ece


@dataclass(frozen=True)
class CalibrationSummary:
    """One split before and after dividing its logits by a temperature fitted elsewhere."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    accuracy: float  # the same before and after: T never changes the argmax
    bins_before: ReliabilityBins
    bins_after: ReliabilityBins

    def metrics(self) -> dict[str, float]:
        """The scalars, for metrics JSON and MLflow."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("bins_")}


def summarize_calibration(logits, labels, temperature: float, bins: int = DEFAULT_BINS) -> CalibrationSummary:
    logits, labels = _checked(logits, labels)
    before = calibrated_probabilities(logits, 1.0)
    after = calibrated_probabilities(logits, temperature)
    bins_before, bins_after = reliability_bins(before, labels, bins), reliability_bins(after, labels, bins)
    return CalibrationSummary(
        temperature=float(temperature),
        ece_before=bins_before.ece, ece_after=bins_after.ece,
        # from the logits, not the probabilities: exact where a true class's probability underflows
        nll_before=_nll_of_logits(logits, labels, 1.0), nll_after=_nll_of_logits(logits, labels, temperature),
        accuracy=float((before.argmax(axis=1) == labels).mean()),
        bins_before=bins_before, bins_after=bins_after,
    )
