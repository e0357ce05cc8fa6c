"""MLflow tracking of every flow (the adapter below tasks and flows: it imports only
tempflow_core and MLflow, never tasks/ or flows/): one parent run per training, pretraining or ablation run, a
child run per iteration, LoRA checkpoints as MLflow 3 LoggedModels chained back to the base
model, and the prompt set and rollout shards recorded as dataset inputs.

An adapter over ``MlflowClient``, not a Prefect task (tasks/tracking_task.py holds those):

    uri.py       the tracking URI (resolved once, never a file store) and the connection
    runs.py      RunTracker: parent and iteration runs, params, metrics, eval tables, artifacts
    models.py    checkpoints as LoggedModels, lineage, registry versions and aliases, downloads
    datasets.py  dataset inputs (prompts, rollout shards)
    values.py    tag names, MLflow's limits, params/tags/metric keys cleaned to fit them

The package imports without a server; only ``RunTracker(...)`` talks to the tracking backend.
Secrets never reach MLflow: config keys that look like credentials are dropped from params
and tags, and credentials in URLs are masked wherever a URI is written (params, tags,
dataset sources, error messages), by the rules of tempflow_core/redaction.py. MLflow's
telemetry is off unless MLFLOW_DISABLE_TELEMETRY says otherwise.
"""

from __future__ import annotations

import os

# MLflow's usage telemetry is off unless the user turns it on (it writes ~/.config/mlflow and
# sends events): set before MLflow is imported by anything below
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from .runs import RunTracker  # noqa: E402
from .uri import TrackingUnavailable, resolve_tracking_uri  # noqa: E402
from .values import MODEL_NAME, flatten_params, is_secret_key, metric_key, redact  # noqa: E402

__all__ = [
    "MODEL_NAME", "RunTracker", "TrackingUnavailable", "flatten_params", "is_secret_key", "metric_key", "redact",
    "resolve_tracking_uri",
]
