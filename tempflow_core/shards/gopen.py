"""Stock webdataset reading s3:// URLs through S3Store (boto3, retries, resumed reads).

webdataset opens a shard URL through its gopen table; for s3:// it would otherwise pipe
`aws s3 cp`, which knows nothing of the store's endpoint or credentials. `register_s3_gopen`
installs, once, a handler that reads through S3 stores, and tells it the store to use for a
bucket. Nothing is registered at import: `shard_urls` registers its store, since its URLs are
what a stock `wds.WebDataset` is given. `iter_samples` needs none of this: its pipeline opens
shards through the store it carries, in every DataLoader worker (spawn included).
"""

from __future__ import annotations

from typing import Any, BinaryIO
from urllib.parse import urlsplit

from webdataset.gopen import gopen_schemes

from tempflow_core.redaction import redact_uri
from tempflow_core.storage import InvalidStoreURI, S3Store, validate_key


class S3GopenHandler:
    """A webdataset gopen handler for s3:// URLs (read only).

    A URL's bucket is read through the store registered for it (same endpoint, credentials and
    retry settings), else through one built from boto3's standard chain (env, profile, role).
    """

    def __init__(self) -> None:
        self.stores: dict[str, S3Store] = {}  # bucket -> a store rooted at the bucket

    def add(self, store: S3Store) -> None:
        """Read `store.bucket` through the settings and credentials of `store`."""
        root = store if not store.prefix else S3Store(store.bucket, "", store.settings, store.credentials)
        self.stores[store.bucket] = root

    def resolve(self, url: str) -> tuple[S3Store, str]:
        """(bucket-root store, key) of an `s3://bucket/key` URL."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or "@" in parts.netloc:
            raise InvalidStoreURI(f"not a plain s3:// URL: {redact_uri(url)}")
        store = self.stores.get(parts.netloc)
        if store is None:
            store = self.stores[parts.netloc] = S3Store(parts.netloc)
        return store, validate_key(parts.path.lstrip("/"), what=f"key of {url}")

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
        if not mode.startswith("r"):
            raise ValueError(f"{redact_uri(url)}: the s3 gopen handler only reads; write shards with write_shards")
        store, key = self.resolve(url)
        return store.open_read(key)


def register_s3_gopen(store: S3Store | None = None) -> S3GopenHandler:
    """Install the s3:// handler in webdataset's gopen table (idempotent) and return it; with a
    store, that store's settings serve its bucket from now on. Per process: a DataLoader worker
    started by spawn that opens s3:// URLs with a stock WebDataset must call it too."""
    handler = gopen_schemes.get("s3")
    if not isinstance(handler, S3GopenHandler):
        handler = S3GopenHandler()
        gopen_schemes["s3"] = handler
    if store is not None:
        handler.add(store)
    return handler
