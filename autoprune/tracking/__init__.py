"""MLflow tracking: writing runs, reading them back, and the figures and tables they carry."""
