"""Opening a store from a URI: `file:///abs/path`, a plain path (the default) or `s3://bucket/prefix`."""

from __future__ import annotations

import os
from typing import Any, Union
from urllib.parse import urlsplit

from tempflow_core.redaction import redact_uri
from tempflow_core.storage.errors import InvalidKey, InvalidStoreURI
from tempflow_core.storage.interface import ObjectStore
from tempflow_core.storage.keys import validate_key
from tempflow_core.storage.local import LocalStore
from tempflow_core.storage.retry import RetryPolicy
from tempflow_core.storage.s3 import S3Store
from tempflow_core.storage.s3_config import S3Credentials, S3Settings

StoreLike = Union[ObjectStore, str, os.PathLike]  # what every data-plane function accepts as a store

# open_store's flat S3 options that are credentials, by S3Credentials field
_CREDENTIAL_OPTIONS = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
                       "aws_session_token": "session_token"}
_RETRY_OPTIONS = ("retries", "backoff", "max_backoff")  # RetryPolicy fields


def open_store(uri: StoreLike, **options: Any) -> ObjectStore:
    """Open `file:///abs/path`, a plain path (the default), or `s3://bucket/prefix`.

    Options go to the store (see `open_s3_store` for S3; `LocalStore` takes none); an opened
    store is returned as is. Raises InvalidStoreURI naming the (redacted) URI for an unknown
    scheme, credentials in the URI, or a `file://` URI with a remote host.
    """
    if isinstance(uri, ObjectStore):
        if options:
            raise TypeError("options cannot be applied to an already opened store")
        return uri
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise InvalidStoreURI(f"store URI must be a non-empty string, got {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return _local(uri, options)
    if "@" in parts.netloc:
        raise InvalidStoreURI(f"store URI {redact_uri(uri)} carries credentials; pass them as options "
                              "or through the standard AWS chain, never inside the URI")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidStoreURI(f"file URI {uri!r} names a remote host {parts.netloc!r}; use file:///abs/path")
        if parts.query or parts.fragment:
            raise InvalidStoreURI(f"file URI {uri!r} must not have a query or fragment")
        from urllib.request import url2pathname

        path = url2pathname(parts.path)
        if not os.path.isabs(path):
            raise InvalidStoreURI(f"file URI {uri!r} must hold an absolute path (file:///abs/path)")
        return _local(path, options)
    if scheme == "s3":
        if parts.query or parts.fragment:
            raise InvalidStoreURI(f"S3 URI {redact_uri(uri)} must not have a query or fragment")
        try:
            prefix = validate_key(parts.path.lstrip("/"), what="S3 prefix", allow_empty=True)
        except InvalidKey as exc:
            raise InvalidStoreURI(f"S3 URI {uri!r}: {exc}") from None
        return open_s3_store(parts.netloc, prefix, **options)
    raise InvalidStoreURI(f"unsupported store URI scheme {scheme!r} in {redact_uri(uri)}; "
                          "use file:///abs/path, a plain path, or s3://bucket/prefix")


def open_s3_store(bucket: str, prefix: str = "", *, create_bucket: bool = False, **options: Any) -> S3Store:
    """An S3Store from flat options, as a config or a CLI gives them.

    Options: `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token` (S3Credentials);
    `retries`, `backoff`, `max_backoff` (RetryPolicy); any other S3Settings field by name.
    `create_bucket` creates the bucket if missing (development servers). An unknown option
    raises TypeError naming it.
    """
    credentials = S3Credentials(**{f: options.pop(o) for o, f in _CREDENTIAL_OPTIONS.items() if o in options})
    retry = RetryPolicy(**{o: options.pop(o) for o in _RETRY_OPTIONS if o in options})
    store = S3Store(bucket, prefix, S3Settings(retry=retry, **options), credentials)
    if create_bucket:
        store.ensure_bucket()
    return store


def _local(path: str, options: dict[str, Any]) -> LocalStore:
    if options:
        raise TypeError(f"a local store takes no options, got {sorted(options)}")
    if "\x00" in path:
        raise InvalidStoreURI("local store path contains a NUL character")
    return LocalStore(path)
