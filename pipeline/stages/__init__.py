"""The DVC stages, one module per stage of dvc.yaml: each main() loads, computes, writes, logs."""
