"""Static images of an Optuna study for the finetune MLflow run: history, importances, coordinates."""

from __future__ import annotations

import warnings

import mlflow
import optuna
from optuna.trial import TrialState


def log_study_plots(s: optuna.Study) -> list[str]:
    """Log what can be drawn (importances need two complete trials with varied params)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {"optuna_history.png": optuna_plots.plot_optimization_history}
    if len(complete) >= 2:
        plots["optuna_importances.png"] = optuna_plots.plot_param_importances
        plots["optuna_parallel_coordinate.png"] = optuna_plots.plot_parallel_coordinate
    logged = []
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
        mlflow.log_figure(figure, name)
        plt.close(figure)
        logged.append(name)
    return logged
