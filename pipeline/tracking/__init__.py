"""MLflow: the store, stage and trial runs, batched logs, lineage, the registry and the promotion gate."""
