"""Entry points: the `tempflow` CLI and (as the pipeline lands) the Prefect flows."""
