"""Pipeline tests (Prefect flows, MLflow tracking)."""
