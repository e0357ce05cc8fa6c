"""Object store: one small interface over a local folder and S3 (AWS or any S3-compatible server).

Stages of the pipeline talk only through this interface (URIs + small JSON manifests), so the
same code runs on a laptop (`file:///...` or a plain path, the default) and on a cluster
(`s3://bucket/prefix`). Keys are '/'-separated paths relative to the store root; they are
validated so that no key can leave the root (`..`, absolute paths, symlinks on the local side).

Failures are made explicit: a missing object raises `ObjectNotFound`, a bad URI or key raises
`InvalidStoreURI` / `InvalidKey`, and an S3 operation that still fails after its retries raises
`StoreUnavailable`, always naming the object's URI. Credentials are never part of a URI, a repr,
a log line or an exception message written by this package.

Modules: `errors`, `keys` (validation), `interface` (ObjectStore), `local` (LocalStore),
`s3` (S3Store) with `s3_config` (S3Settings, S3Credentials), `s3_reader` (resumed reads),
`s3_logs` (boto3 log redaction) and `retry` (RetryPolicy, transient errors), `factory`
(open_store).
"""

from tempflow_core.redaction import redact_uri
from tempflow_core.storage.errors import InvalidKey, InvalidStoreURI, ObjectNotFound, StoreError, StoreUnavailable
from tempflow_core.storage.factory import StoreLike, open_s3_store, open_store
from tempflow_core.storage.interface import ObjectStore, iter_chunks
from tempflow_core.storage.keys import MAX_KEY_BYTES, join_key, validate_key
from tempflow_core.storage.local import LocalStore
from tempflow_core.storage.retry import RetryPolicy
from tempflow_core.storage.s3 import S3Store
from tempflow_core.storage.s3_config import S3Credentials, S3Settings

__all__ = [
    "MAX_KEY_BYTES", "InvalidKey", "InvalidStoreURI", "LocalStore", "ObjectNotFound", "ObjectStore", "RetryPolicy",
    "S3Credentials", "S3Settings", "S3Store", "StoreError", "StoreLike", "StoreUnavailable", "iter_chunks",
    "join_key", "open_s3_store", "open_store", "redact_uri", "validate_key",
]
