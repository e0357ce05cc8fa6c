"""What reaches MLflow: the tag names of the project, MLflow's limits, and params, tags and
metric keys cleaned to fit them. Keys that name a credential are dropped and credentials
inside values masked, by the project's one set of rules (tempflow_core/redaction.py)."""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from tempflow_core.redaction import is_secret_key
from tempflow_core.redaction import redact_uris as redact

MODEL_NAME = "tempflow-lora"
MODEL_TYPE = "lora-adapter"
BASE = "base"

# What an experiment of tempflow is to MLflow: model training (not GenAI development).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_page(server: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (its runs) or of one run, in the UI's model-training
    view: MLflow 3's UI opens every experiment on its GenAI overview (traces, judges) unless the
    link asks for `workflowType=machine_learning` (or the browser chose it before)."""
    path = "experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}/#/{path}?workflowType=machine_learning"
TAG_KIND = "tempflow.kind"
TAG_ITERATION = "tempflow.iteration"
TAG_RESUMED_FROM = "tempflow.resumed_from"
TAG_TRACKED_ELSEWHERE = "tempflow.mlflow_run_elsewhere"  # the MLflow run id a resumed run had on another server
TAG_RUN_NAME = "tempflow.run_name"
TAG_CHECKPOINT_URI = "tempflow.checkpoint_uri"
TAG_ROLLOUT_MANIFEST = "tempflow.rollout_manifest_uri"
TAG_PARENT_MODEL = "tempflow.parent_model_id"  # a model id, or "base"
TAG_BASE_MODEL = "tempflow.base_model"
TAG_TRAINING_RUN = "tempflow.training_run_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
TAG_MODEL_ID = "tempflow.model_id"

# MLflow 3.17 limits (mlflow.utils.validation).
MAX_KEY = 250
MAX_PARAM_VAL = 6000
MAX_TAG_VAL = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_DATASET_DIGEST = 36  # a sha256 hex (64) is rejected: the full digest goes into an input tag
MAX_INPUT_TAG_VAL = 500

# MLflow accepts alphanumerics, '_', '-', '.', ' ', '/' and ':' in param, tag and metric keys.
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")



def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings with dots; values stringified; secret-looking keys dropped."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if is_secret_key(key):
            continue
        if isinstance(v, Mapping):
            out.update(flatten_params(v, prefix=f"{key}."))
            continue
        out[clip(_KEY_BAD.sub("_", key), MAX_KEY)] = clip(redact(_to_str(v)), MAX_PARAM_VAL)
    return out


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, pathlib.PurePath):
        return str(v)
    if isinstance(v, (list, tuple)):
        try:
            return json.dumps(v, default=str)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def clip(s: str, n: int) -> str:
    """s cut to n characters (ending in '...' when cut)."""
    return s if len(s) <= n else s[: n - 3] + "..."


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags MLflow accepts: valid keys, clipped and redacted values; None values and secret keys dropped."""
    return {
        clip(_KEY_BAD.sub("_", str(k)), MAX_KEY): clip(redact(_to_str(v)), MAX_TAG_VAL)
        for k, v in (tags or {}).items()
        if v is not None and not is_secret_key(str(k))
    }


def metric_key(name: str) -> str:
    """A name MLflow accepts as metric / image key (invalid characters become '_')."""
    return clip(_KEY_BAD.sub("_", str(name)), MAX_KEY)


def finite(v: Any) -> float | None:
    """v as a float (numbers, 0-d tensors/arrays), or None when not a finite number."""
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def markdown_table(md: str) -> dict[str, list[str]] | None:
    """A pipe table -> {column: [cells]} (None when the text holds no such table)."""
    rows = [ln.strip() for ln in md.splitlines() if ln.strip().startswith("|")]
    if len(rows) < 2:
        return None
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    header, body = cells[0], [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c or "-") for c in r)]
    if not header or any(len(r) != len(header) for r in body):
        return None
    return {h or f"col{i}": [r[i] for r in body] for i, h in enumerate(header)}
