"""The reliability diagram: accuracy against top-1 confidence per bin, before and after temperature
scaling, over the bin counts. Drawn like the report's other images (figures.save writes the PNG)."""

from __future__ import annotations

import numpy as np

from pipeline.model.calibration import CalibrationSummary, ReliabilityBins
from pipeline.reporting.figures import _pyplot


def reliability_diagram(curves: dict[str, ReliabilityBins]):
    """curves: {legend label: bins}, all with the same edges. Top: each curve's accuracy at its
    bins' mean confidence (empty bins skipped) against the diagonal a calibrated model lies on;
    bottom: how many images each bin holds, since a bin of three images says little."""
    plt = _pyplot()
    figure, (curve_ax, count_ax) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    curve_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    edges = next(iter(curves.values())).edges
    width = np.diff(edges) / (len(curves) + 1)
    for i, (label, bins) in enumerate(curves.items()):
        filled = bins.count > 0
        curve_ax.plot(bins.confidence[filled], bins.accuracy[filled], marker="o",
                      label=f"{label} (ECE {bins.ece:.3f})")
        count_ax.bar(edges[:-1] + (i + 0.5) * width, bins.count, width=width, align="edge", label=label)
    curve_ax.set_xlim(0, 1)
    curve_ax.set_ylim(0, 1)
    curve_ax.set_ylabel("accuracy")
    curve_ax.set_title("reliability (top-1 confidence)")
    curve_ax.legend(loc="upper left", fontsize=8)
    count_ax.set_xlabel("confidence")
    count_ax.set_ylabel("images")
    figure.tight_layout()
    return figure


def calibration_diagram(summary: CalibrationSummary):
    """The reliability diagram of one split, uncalibrated and divided by its fitted temperature."""
    return reliability_diagram({"uncalibrated": summary.bins_before,
                                f"T = {summary.temperature:.2f}": summary.bins_after})
