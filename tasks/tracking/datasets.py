"""Dataset inputs: the prompt set of a run and the rollout shards of an iteration, recorded as
MLflow MetaDatasets (a source resolved from the URI, a name, a digest) with context tags."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from .values import MAX_DATASET_DIGEST, MAX_INPUT_TAG_VAL, clip, redact


def dataset_input(uri: str, name: str, digest: str, context: str, extra_tags: Mapping[str, str] | None = None):
    """A DatasetInput for ``uri``. MLflow keeps 36 characters of a digest: a longer one is
    kept whole in the input tag tempflow.digest. ValueError for a URI without a dataset source."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    safe_uri = redact(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" (local)
            source = resolve_dataset_source(safe_uri)
    except MlflowException as e:
        raise ValueError(f"dataset URI {safe_uri!r} has no MLflow dataset source "
                         "(use file://..., s3://..., a local path, or http(s)://...)") from e
    digest = str(digest)
    ds = MetaDataset(source, name=clip(name, 500), digest=digest[:MAX_DATASET_DIGEST])
    tags = [InputTag("mlflow.data.context", context)]
    if len(digest) > MAX_DATASET_DIGEST:
        tags.append(InputTag("tempflow.digest", clip(digest, MAX_INPUT_TAG_VAL)))
    for k, v in (extra_tags or {}).items():
        tags.append(InputTag(k, clip(redact(str(v)), MAX_INPUT_TAG_VAL)))
    return DatasetInput(ds._to_mlflow_entity(), tags=tags)
