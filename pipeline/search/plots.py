"""Static images of an Optuna study: history, importances, parallel coordinates.

The finetune stage logs them to its MLflow run; the report stage saves them next to the report.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

from pipeline.tracking import logs


def study_figures(s: optuna.Study, parallel_coordinate: bool = True) -> dict:
    """{file name: matplotlib figure} of what can be drawn (importances need two complete trials
    with varied params). The caller closes the figures."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {"optuna_history.png": optuna_plots.plot_optimization_history}
    if len(complete) >= 2:
        plots["optuna_importances.png"] = optuna_plots.plot_param_importances
        if parallel_coordinate:
            plots["optuna_parallel_coordinate.png"] = optuna_plots.plot_parallel_coordinate
    figures = {}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib API experimental
                axes = plot(s)
        except (ValueError, RuntimeError):  # e.g. importances of a constant parameter
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figures[name] = figure
    return figures


def log_study_plots(s: optuna.Study) -> list[str]:
    """Draw the figures, then log them to the active run in one call (drawing is not tracking)."""
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt


    figures = study_figures(s)
    with tempfile.TemporaryDirectory() as tmp:
        for name, figure in figures.items():
            figure.savefig(Path(tmp) / name)
            plt.close(figure)
        logs.log_artifacts(tmp)
    return list(figures)
