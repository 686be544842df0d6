"""MLflow tracking: the store and its URIs, writing runs, reading them back, rows as tables."""
