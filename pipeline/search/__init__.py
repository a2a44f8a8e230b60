"""The Optuna search: study identity, storage, sampler and pruner, the one trial loop, trials, selection, plots."""
