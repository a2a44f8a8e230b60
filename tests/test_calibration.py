"""Temperature scaling and the calibration measures, on synthetic data whose calibration is known."""

import json

import numpy as np
import pytest
import torch

from pipeline.model.calibration import (
    TEMPERATURE_RANGE,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
    nll,
    reliability_bins,
    summarize_calibration,
)


def calibrated_sample(n: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a model with these logits is calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, classes))
    probs = calibrated_probabilities(logits, 1.0)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)  # one categorical draw per row
    return logits, labels


def test_calibrated_logits_fit_a_temperature_near_one():
    logits, labels = calibrated_sample(20_000)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_over_confident_logits_fit_a_temperature_above_one_and_lose_ece():
    logits, labels = calibrated_sample(20_000)
    over_confident = 3.0 * logits
    temperature = fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    summary = summarize_calibration(over_confident, labels, temperature)
    assert summary.ece_before > 0.1
    assert summary.ece_after < summary.ece_before / 4
    assert summary.nll_after < summary.nll_before


def test_a_temperature_fitted_on_one_split_does_not_raise_nll_on_another():
    fit_logits, fit_labels = calibrated_sample(3_000, seed=1)
    test_logits, test_labels = calibrated_sample(3_000, seed=2)
    temperature = fit_temperature(2.5 * fit_logits, fit_labels)
    summary = summarize_calibration(2.5 * test_logits, test_labels, temperature)
    assert summary.nll_after <= summary.nll_before
    assert summary.ece_after < summary.ece_before


def test_temperature_never_changes_the_predicted_class():
    logits, labels = calibrated_sample(2_000)
    summary = summarize_calibration(4.0 * logits, labels, fit_temperature(4.0 * logits, labels))
    after = calibrated_probabilities(4.0 * logits, summary.temperature)
    np.testing.assert_array_equal(after.argmax(axis=1), logits.argmax(axis=1))
    assert summary.accuracy == pytest.approx((after.argmax(axis=1) == labels).mean())


def test_ece_of_a_perfectly_calibrated_toy_case_is_zero():
    # 3 of 4 right at confidence 0.75, and 2 of 2 right at confidence 1
    probs = np.array([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_equals_the_hand_computed_value():
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.45, 0.55], [0.65, 0.35]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 0.1: (0.8, 0.9] holds 2 at confidence 0.85, 1 right → |0.5 − 0.85| = 0.35, weight 1/2;
    # (0.5, 0.6] holds 0.55, right → 0.45, weight 1/4; (0.6, 0.7] holds 0.65, right → 0.35, weight 1/4
    expected = 0.5 * 0.35 + 0.25 * 0.45 + 0.25 * 0.35
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(expected)


def test_bins_are_closed_on_the_right_and_report_counts():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 0, 0])
    found = reliability_bins(probs, labels, bins=2)
    np.testing.assert_array_equal(found.count, [1, 2])  # 0.5 is in (0, 0.5], not (0.5, 1]
    np.testing.assert_allclose(found.confidence, [0.5, 0.85])
    np.testing.assert_allclose(found.accuracy, [1.0, 0.5])


def test_bin_rows_are_json_with_null_for_empty_bins():
    probs = np.array([[0.95, 0.05], [0.97, 0.03]])  # both in the top bin, (14/15, 1]
    rows = reliability_bins(probs, np.array([0, 1]), bins=15).rows()
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 2
    assert rows[0] == {"lower": 0.0, "upper": pytest.approx(1 / 15), "count": 0, "confidence": None, "accuracy": None}
    assert rows[-1]["count"] == 2 and rows[-1]["accuracy"] == 0.5
    json.dumps(rows, allow_nan=False)


def test_summary_metrics_are_plain_floats():
    logits, labels = calibrated_sample(500)
    metrics = summarize_calibration(logits, labels, 1.3).metrics()
    assert set(metrics) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "accuracy"}
    json.dumps(metrics, allow_nan=False)


def test_nll_matches_the_definition():
    probs = np.array([[0.5, 0.5], [0.1, 0.9]])
    assert nll(probs, np.array([0, 1])) == pytest.approx(-(np.log(0.5) + np.log(0.9)) / 2)


def test_probabilities_and_tensors_are_accepted():
    logits, labels = calibrated_sample(2_000)
    probs = calibrated_probabilities(2.0 * logits, 1.0).astype(np.float32)
    from_probs = fit_temperature(logits_from_probabilities(probs), labels)
    from_tensor = fit_temperature(torch.from_numpy(2.0 * logits).float(), torch.from_numpy(labels))
    assert from_probs == pytest.approx(from_tensor, rel=1e-3)


def test_a_separable_split_stays_inside_the_temperature_range():
    logits = np.array([[10.0, -10.0], [-10.0, 10.0]] * 10)
    labels = np.array([0, 1] * 10)
    assert TEMPERATURE_RANGE[0] <= fit_temperature(logits, labels) <= TEMPERATURE_RANGE[1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))


def test_the_reliability_diagram_is_a_png(tmp_path):
    from PIL import Image

    from pipeline.reporting.calibration_plot import calibration_diagram
    from pipeline.reporting.figures import save

    logits, labels = calibrated_sample(1_000)
    summary = summarize_calibration(3.0 * logits, labels, fit_temperature(3.0 * logits, labels))
    path = save(calibration_diagram(summary), tmp_path / "calibration.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.width > 300 and image.height > 300
