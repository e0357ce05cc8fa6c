"""Scores: per-sample values (rewards, advantages, reward details) beside a rollout stage.

`write_scores` puts one safetensors object of arrays aligned with the sample keys, and its own
manifest, under `{prefix}/{name}/`; scoring never rewrites a shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy
import torch

from tempflow_core.canonical import canonical_safetensors
from tempflow_core.storage import StoreLike, join_key, open_store, validate_key
from tempflow_core.shards.errors import SchemaError
from tempflow_core.shards.manifest import (
    Manifest, get_listed_object, now, prepare_prefix, provenance, put_listed_object, require_manifest, scrub_metadata,
    stage_complete, write_manifest,
)
from tempflow_core.shards.schema import SAMPLE_KEY, SCHEMA_VERSION, SCORES_NAME, check_sample_key


@dataclass
class Scores:
    """Per-sample values (rewards, advantages, reward details) keyed by sample key."""

    name: str
    keys: list[str]
    values: dict[str, np.ndarray]  # field -> [N, ...] aligned with keys
    meta: dict[str, Any]
    manifest: Manifest

    def mapping(self, field_name: str) -> dict[str, Any]:
        """{sample key: value} of one field."""
        arr = self._field(field_name)
        return {k: arr[i] for i, k in enumerate(self.keys)}

    def aligned(self, keys: Sequence[str], field_name: str) -> np.ndarray:
        """The field's values in the order of `keys` (e.g. RolloutBatch.sample_keys())."""
        arr = self._field(field_name)
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"scores {self.name!r} have no value for {len(missing)} keys, e.g. {missing[:3]}")
        return arr[[index[k] for k in keys]]

    def _field(self, field_name: str) -> np.ndarray:
        if field_name not in self.values:
            raise KeyError(f"scores {self.name!r} have no field {field_name!r}; fields: {sorted(self.values)}")
        return self.values[field_name]


def _scores_prefix(prefix: str, name: str) -> str:
    prefix = validate_key(prefix, what="scores prefix")
    if not isinstance(name, str) or not SAMPLE_KEY.match(name):
        raise SchemaError(f"scores name {name!r} must use letters, digits, '_' and '-'")
    return join_key(prefix, name)


def _as_numpy(value: Any, field_name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise SchemaError(f"scores field {field_name!r}: bfloat16 is not a numpy dtype; convert to float32")
        value = value.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(value))
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise SchemaError(f"scores field {field_name!r}: numeric arrays only, got dtype {arr.dtype}")
    return arr


def _check_arrays(name: str, keys: list[str], values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The value fields as numpy arrays whose first dimension follows `keys`."""
    for k in keys:
        check_sample_key(k, f"scores {name!r} key")
    if len(set(keys)) != len(keys):
        raise SchemaError(f"scores {name!r}: keys must be unique")
    if not values:
        raise SchemaError(f"scores {name!r}: no value fields given")
    arrays: dict[str, np.ndarray] = {}
    for field_name, value in values.items():
        if not isinstance(field_name, str) or not field_name or field_name.startswith("__"):
            raise SchemaError(f"scores {name!r}: invalid field name {field_name!r}")
        arr = _as_numpy(value, field_name)
        if arr.ndim == 0 or arr.shape[0] != len(keys):
            raise SchemaError(f"scores {name!r} field {field_name!r} has shape {arr.shape}; its first dimension "
                              f"must be the {len(keys)} keys")
        arrays[field_name] = arr
    return arrays


def write_scores(
    store: StoreLike,
    prefix: str,
    name: str,
    keys: Sequence[str],
    values: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
    producer: Mapping[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    config_hash: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write per-sample values under `{prefix}/{name}/` (safetensors + manifest, manifest last).

    `values` maps a field (e.g. "reward", "advantage", "pickscore.raw") to an array whose first
    dimension follows `keys`. Rollout shards are never touched.
    """
    store = open_store(store)
    sp = _scores_prefix(prefix, name)
    keys = [str(k) for k in keys]
    arrays = _check_arrays(name, keys, values)
    prod, ckpt, cfg = provenance(producer, checkpoint_uri, config_hash)
    prepare_prefix(store, sp, overwrite)
    data = canonical_safetensors(safetensors.numpy.save(arrays, metadata={"schema_version": str(SCHEMA_VERSION),
                                                                          "keys": json.dumps(keys)}))
    info = put_listed_object(store, sp, SCORES_NAME, data)
    manifest = Manifest(
        kind="scores", num_keys=len(keys), objects={"scores": info}, checkpoint_uri=ckpt, config_hash=cfg,
        producer=prod, created_at=now(),
        extra={"name": name, "meta": scrub_metadata(dict(meta or {}), "meta"),
               "fields": {f: {"dtype": str(a.dtype), "shape": list(a.shape)} for f, a in arrays.items()}},
    )
    write_manifest(store, sp, manifest)
    return manifest


def read_scores(store: StoreLike, prefix: str, name: str, *, verify: bool = True) -> Scores:
    """Scores written by write_scores; StageNotFound when their manifest is missing."""
    store = open_store(store)
    sp = _scores_prefix(prefix, name)
    m = require_manifest(store, sp, kind="scores")
    data = get_listed_object(store, sp, m, "scores", verify)
    arrays = safetensors.numpy.load(data)
    uri = store.uri_for(join_key(sp, SCORES_NAME))
    keys = json.loads(_safetensors_metadata(data, uri).get("keys", "[]"))
    for field_name, arr in arrays.items():
        if arr.shape[0] != len(keys):
            raise SchemaError(f"{uri}: field {field_name!r} does not match its {len(keys)} keys")
    return Scores(name=name, keys=keys, values=arrays, meta=dict(m.extra.get("meta", {})), manifest=m)


def _safetensors_metadata(data: bytes, uri: str) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise SchemaError(f"{uri}: unreadable safetensors header ({exc})") from None


def scores_complete(store: StoreLike, prefix: str, name: str) -> bool:
    """Whether scores `name` exist under `prefix` (manifest present)."""
    return stage_complete(store, _scores_prefix(prefix, name))
