"""The manifest of a stage output: what it holds, from what, and the proof that it is complete.

A stage writes its objects first and its manifest.json last (atomically), so a prefix without a
manifest holds no stage, whatever else lies there. Every object is listed with its sha256 and
size, and is checked against them when read. Provenance (producer, extra) is scrubbed of
credentials before it is written: manifests are shared and logged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from tempflow_core.redaction import redact_uri, scrub_mapping, secret_key_paths
from tempflow_core.storage import ObjectNotFound, ObjectStore, StoreLike, join_key, open_store, validate_key
from tempflow_core.shards.errors import SchemaError, ShardIntegrityError, StageExists, StageNotFound
from tempflow_core.shards.schema import MANIFEST_NAME, SCHEMA_VERSION

log = logging.getLogger("tempflow.shards")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ObjectInfo:
    """One object of a stage output, relative to the stage prefix."""

    name: str
    sha256: str
    bytes: int


@dataclass
class ShardInfo(ObjectInfo):
    """One tar shard of a stage output and the samples it holds."""

    samples: int = 0  # webdataset samples (branch points or trajectories)
    keys: list[str] = field(default_factory=list)  # their __key__s, in order


@dataclass
class Manifest:
    """What a stage produced and from what; written last, so its presence means 'complete'."""

    kind: str  # "rollouts" | "scores"
    schema_version: int = SCHEMA_VERSION
    rollout_kind: str | None = None  # "branch" | "plain" for rollouts
    num_samples: int = 0  # webdataset samples
    num_keys: int = 0  # child / trajectory keys: what rewards and advantages refer to
    shards: list[ShardInfo] = field(default_factory=list)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    checkpoint_uri: str | None = None
    config_hash: str | None = None
    producer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> bytes:
        try:
            return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"manifest is not JSON-serialisable (producer/extra fields?): {exc}") from None

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> "Manifest":
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaError(f"manifest {uri} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SchemaError(f"manifest {uri} must be a JSON object")
        version = raw.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise SchemaError(f"manifest {uri}: field 'schema_version' is missing or invalid ({version!r})")
        if version > SCHEMA_VERSION:
            raise SchemaError(f"manifest {uri} has schema_version {version}; this tempflow reads up to "
                              f"{SCHEMA_VERSION} (upgrade tempflow)")
        try:
            shards = [ShardInfo(**_check_object(s, uri, "shards")) for s in raw.get("shards", [])]
            objects = {k: ObjectInfo(**_check_object(v, uri, f"objects.{k}"))
                       for k, v in raw.get("objects", {}).items()}
            kw = {k: raw[k] for k in ("kind", "rollout_kind", "num_samples", "num_keys", "checkpoint_uri",
                                       "config_hash", "producer", "extra", "created_at") if k in raw}
            return cls(schema_version=version, shards=shards, objects=objects, **kw)
        except TypeError as exc:
            raise SchemaError(f"manifest {uri}: unexpected or missing field ({exc})") from None


def _check_object(entry: Any, uri: str, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise SchemaError(f"manifest {uri}: {where} entry must be an object")
    name = entry.get("name")
    if not isinstance(name, str) or "/" in name:
        raise SchemaError(f"manifest {uri}: {where} entry has an invalid 'name' {name!r}")
    validate_key(name, what=f"manifest {uri} object name")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        raise SchemaError(f"manifest {uri}: {where} '{name}' has an invalid 'sha256'")
    if not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0:
        raise SchemaError(f"manifest {uri}: {where} '{name}' has an invalid 'bytes'")
    return entry


# ---------------------------------------------------------------------------- on the store
def manifest_key(prefix: str) -> str:
    return join_key(prefix, MANIFEST_NAME)


def read_manifest(store: StoreLike, prefix: str) -> Manifest | None:
    """The manifest of the stage output at `prefix`, or None when there is none (never ran or
    interrupted: shards without a manifest do not count)."""
    store = open_store(store)
    key = manifest_key(prefix)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    return Manifest.from_json(data, store.uri_for(key))


def require_manifest(store: StoreLike, prefix: str, kind: str | None = None) -> Manifest:
    """Like read_manifest, but a missing manifest raises StageNotFound naming the URI."""
    store = open_store(store)
    m = read_manifest(store, prefix)
    if m is None:
        raise StageNotFound(f"no complete stage output at {store.uri_for(join_key(prefix))}: {MANIFEST_NAME} is "
                            "missing (the stage never ran or was interrupted before its manifest)")
    if kind is not None and m.kind != kind:
        raise SchemaError(f"{store.uri_for(manifest_key(prefix))} describes a {m.kind!r} output, expected {kind!r}")
    return m


def stage_complete(store: StoreLike, prefix: str) -> bool:
    """Whether a stage output exists at `prefix` (its manifest is present and readable)."""
    return read_manifest(store, prefix) is not None


def write_manifest(store: StoreLike, prefix: str, manifest: Manifest) -> str:
    """Publish the manifest (atomic on both stores); returns its URI. Call it last."""
    store = open_store(store)
    key = manifest_key(prefix)
    store.put_bytes(key, manifest.to_json())
    return store.uri_for(key)


def prepare_prefix(store: ObjectStore, prefix: str, overwrite: bool) -> None:
    """Refuse to replace a complete stage unless asked; when asked, hide it first."""
    key = manifest_key(prefix)
    if store.exists(key):
        if not overwrite:
            raise StageExists(f"{store.uri_for(key)} exists: the stage output is complete; pass overwrite=True "
                              "to replace it")
        store.delete(key)  # from here on readers see no stage, until the new manifest lands


# ---------------------------------------------------------------------------- listed objects
def put_listed_object(store: ObjectStore, prefix: str, name: str, data: bytes) -> ObjectInfo:
    """Write `{prefix}/{name}` and return its manifest entry."""
    store.put_bytes(join_key(prefix, name), data)
    return ObjectInfo(name, hashlib.sha256(data).hexdigest(), len(data))


def get_listed_object(store: ObjectStore, prefix: str, manifest: Manifest, field_name: str,
                      verify: bool = True) -> bytes:
    """The bytes of `manifest.objects[field_name]`, checked against its sha256 and size."""
    if field_name not in manifest.objects:
        raise SchemaError(f"manifest {store.uri_for(manifest_key(prefix))} lacks field 'objects.{field_name}'")
    info = manifest.objects[field_name]
    key = join_key(prefix, info.name)
    data = store.get_bytes(key)
    if verify and (hashlib.sha256(data).hexdigest() != info.sha256 or len(data) != info.bytes):
        raise ShardIntegrityError(f"object {store.uri_for(key)} is corrupt: its sha256/size differ from the manifest")
    return data


# ---------------------------------------------------------------------------- provenance
def now() -> str:
    """UTC time to the second, ISO 8601 (Manifest.created_at)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def scrub_metadata(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Copy of producer / extra metadata with credentials removed (`redaction.scrub_mapping`);
    keys must be strings. Each masked field is named in a warning."""
    _check_string_keys(value, where)
    for path in secret_key_paths(value, where):
        log.warning("%s looks like a credential; it is not written to the manifest", path)
    return scrub_mapping(value)


def _check_string_keys(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"{path}: keys must be strings, got {k!r}")
            _check_string_keys(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_string_keys(v, f"{path}[{i}]")


def provenance(producer: Mapping[str, Any] | None, checkpoint_uri: str | None,
               config_hash: str | None) -> tuple[dict[str, Any], str | None, str | None]:
    """(scrubbed producer, redacted checkpoint URI, config hash), the last two taken from the
    producer's own fields when not given."""
    prod = scrub_metadata(dict(producer or {}), "producer")
    ckpt = checkpoint_uri or prod.get("checkpoint_uri") or prod.get("checkpoint")
    cfg = config_hash or prod.get("config_hash") or prod.get("config_digest")
    return prod, (redact_uri(str(ckpt)) if ckpt else None), (str(cfg) if cfg else None)
