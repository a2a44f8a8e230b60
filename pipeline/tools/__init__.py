"""Commands beside the stage graph: bench, stability, retrain."""
