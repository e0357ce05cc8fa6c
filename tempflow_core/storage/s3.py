"""The S3 store: objects in a bucket under an optional prefix, on AWS or an S3-compatible server.

Every operation runs under the store's retry policy (`retry.py`) and maps what still fails to a
StoreError naming the object's URI: ObjectNotFound, StoreUnavailable after the retries, a plain
StoreError for what no retry can fix (a missing bucket, no credentials). Credentials are never
part of a URI, a repr, a log line or an exception message written here.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from typing import Any, BinaryIO, Callable, TypeVar

from tempflow_core.redaction import redact_text, redact_uri
from tempflow_core.storage.errors import InvalidStoreURI, ObjectNotFound, StoreError, StoreUnavailable
from tempflow_core.storage.interface import ObjectStore
from tempflow_core.storage.keys import folder_prefix, validate_key
from tempflow_core.storage.retry import NOT_FOUND_CODES, client_error_code, describe, is_transient
from tempflow_core.storage.s3_config import S3Credentials, S3Settings
from tempflow_core.storage.s3_logs import protect_logs
from tempflow_core.storage.s3_reader import S3ObjectReader

log = logging.getLogger("tempflow.storage")

T = TypeVar("T")

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DELETE_BATCH = 1000  # S3's limit of keys per DeleteObjects request


class S3Store(ObjectStore):
    """Objects in an S3 bucket under an optional prefix (`s3://bucket/prefix`).

    Args:
        bucket, prefix: where the store's root lives.
        settings: endpoint, client, transfer and retry settings (default: boto3's chain decides).
        credentials: explicit credentials (default: boto3's standard chain picks them).

    The boto3 client is built lazily, once per process (and again after a fork: sockets are not
    shared). A pickled store carries its settings but no client, so a DataLoader worker started
    by spawn reaches the same endpoint with the same credentials.
    """

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None,
                 credentials: S3Credentials | None = None):
        if not _BUCKET_NAME.match(bucket or ""):
            raise InvalidStoreURI(f"invalid S3 bucket name {bucket!r} (3-63 chars: a-z, 0-9, '.', '-')")
        self.bucket = bucket
        self.prefix = validate_key(prefix, what="prefix", allow_empty=True)
        self.settings = settings or S3Settings()
        self.credentials = credentials or S3Credentials()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._reset_client()

    def _reset_client(self) -> None:
        self._client_obj: Any = None
        self._client_pid = -1
        self._chain_credentials = S3Credentials()  # those the chain picked, for redaction
        self._lock = threading.Lock()

    # -- pickling (DataLoader workers under spawn): no client, no lock
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_client_obj", "_client_pid", "_chain_credentials", "_lock"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_client()

    def __repr__(self) -> str:
        endpoint = self.settings.endpoint_url
        ep = f", endpoint_url={redact_uri(endpoint)!r}" if endpoint else ""
        return f"S3Store({self.uri!r}{ep})"

    # -- client
    @property
    def client(self) -> Any:
        """A boto3 S3 client for this process (rebuilt after a fork: sockets are not shared)."""
        with self._lock:
            if self._client_obj is None or self._client_pid != os.getpid():
                self._client_obj = self._make_client()
                self._client_pid = os.getpid()
            return self._client_obj

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        s, c = self.settings, self.credentials
        session = boto3.session.Session(
            aws_access_key_id=c.access_key_id, aws_secret_access_key=c.secret_access_key,
            aws_session_token=c.session_token, region_name=s.region_name, profile_name=s.profile_name)
        config = Config(
            retries={"total_max_attempts": s.max_attempts, "mode": s.retry_mode},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_pool_connections=max(10, 2 * s.max_concurrency),
            s3={"addressing_style": s.addressing_style} if s.addressing_style else None,
        )
        creds = session.get_credentials()  # whichever the chain picked: env, profile, role, options
        frozen = creds.get_frozen_credentials() if creds is not None else None
        if frozen is not None:
            self._chain_credentials = S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        protect_logs(*c.values(), *self._chain_credentials.values())
        return session.client("s3", endpoint_url=s.endpoint_url, config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(multipart_threshold=s.multipart_threshold, multipart_chunksize=s.multipart_chunksize,
                              max_concurrency=s.max_concurrency)

    # -- keys
    def full_key(self, key: str) -> str:
        """The bucket key of a store key (the prefix prepended)."""
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        key = validate_key(key, allow_empty=True)
        return f"{self.uri}/{key}" if key else self.uri

    # -- retries and error mapping
    def redact(self, text: str) -> str:
        """`text` with this store's credentials (and any credential-shaped string) masked."""
        return redact_text(text, (*self.credentials.values(), *self._chain_credentials.values()))

    def call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """Run `fn` under this store's retry policy; map its errors to StoreErrors naming `uri`."""
        policy = self.settings.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                self._raise_if_permanent(op, uri, exc)
                if attempt >= policy.retries:
                    raise StoreUnavailable(
                        f"{op} {uri} failed after {attempt} attempts (each up to {self.settings.max_attempts} "
                        f"botocore attempts): {self.redact(describe(exc))}") from exc
                delay = policy.delay(attempt)
                log.warning("transient error on %s %s (attempt %d/%d): %s; retrying in %.2f s",
                            op, uri, attempt, policy.retries, self.redact(describe(exc)), delay)
                time.sleep(delay)

    def _raise_if_permanent(self, op: str, uri: str, exc: BaseException) -> None:
        import botocore.exceptions as bex

        if isinstance(exc, bex.ClientError):
            code, status = client_error_code(exc)
            if code in NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                raise ObjectNotFound(f"object not found: {uri}") from None
            if code == "NoSuchBucket":  # not ObjectNotFound: a wrong bucket must not read as "stage absent"
                raise StoreError(f"bucket does not exist: s3://{self.bucket} (while {op} {uri})") from None
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            raise StoreError(f"{op} {uri}: no usable AWS credentials ({type(exc).__name__}); set them through "
                             "the standard chain (env, profile, instance role) or the store options") from None
        if not is_transient(exc):
            raise StoreError(f"{op} {uri} failed: {self.redact(describe(exc))}") from exc

    # -- operations
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for development servers such as moto)."""
        import botocore.exceptions as bex

        def run() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except bex.ClientError as exc:
                code, status = client_error_code(exc)
                if status != 404 and code not in ("NoSuchBucket", "404", "NotFound"):
                    raise
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                region = self.client.meta.region_name
                if region and region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                try:
                    self.client.create_bucket(**kwargs)
                except bex.ClientError as exc2:
                    if client_error_code(exc2)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self.call("create bucket", f"s3://{self.bucket}", run)

    def put_bytes(self, key: str, data: bytes) -> None:
        full, uri = self.full_key(key), self.uri_for(key)
        if len(data) >= self.settings.multipart_threshold:
            self.call("put", uri, lambda: self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, full, Config=self._transfer_config()))
        else:
            self.call("put", uri, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full, uri = self.full_key(key), self.uri_for(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"put {uri}: local file {os.fspath(path)!r} does not exist")
        self.call("put", uri, lambda: self.client.upload_file(
            os.fspath(path), self.bucket, full, Config=self._transfer_config()))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): S3 answers 412 when the key exists."""
        import botocore.exceptions as bex

        full, uri = self.full_key(key), self.uri_for(key)

        def run() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except bex.ClientError as exc:
                code, status = client_error_code(exc)
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise

        return self.call("conditional put", uri, run)

    def clean_temporary(self, prefix: str) -> int:
        """Abort the multipart uploads a killed writer left unfinished under `prefix`."""
        root = f"{self.prefix}/" if self.prefix else ""
        folder = root + folder_prefix(prefix)

        def run() -> int:
            n = 0
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for up in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
            return n

        return self.call("abort uploads", self.uri_for(folder_prefix(prefix).rstrip("/")), run)

    def open_read(self, key: str) -> BinaryIO:
        raw = S3ObjectReader(self, self.full_key(key), self.uri_for(key))
        return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        full, uri = self.full_key(key), self.uri_for(key)
        head = self.call("head", uri, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        folder = folder_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""

        def run() -> list[str]:
            keys: list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + folder)
            for page in pages:
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", []))
            return keys

        return sorted(self.call("list", self.uri_for(folder.rstrip("/")), run))

    def entries(self, prefix: str = "", limit: int = 1000) -> list[str]:
        folder = folder_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        start = len(root + folder)

        def run() -> list[str]:
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=root + folder, Delimiter="/",
                                               MaxKeys=max(1, min(limit, 1000)))
            return ([p["Prefix"][start:] for p in page.get("CommonPrefixes", [])]
                    + [o["Key"][start:] for o in page.get("Contents", [])])

        return sorted(self.call("list", self.uri_for(folder.rstrip("/")), run))[:limit]

    def delete(self, key: str) -> None:
        full, uri = self.full_key(key), self.uri_for(key)
        self.call("delete", uri, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        uri = self.uri_for(prefix)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self.full_key(k)} for k in keys[i:i + _DELETE_BATCH]]

            def run(batch: list[dict[str, str]] = batch) -> None:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                errors = resp.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise StoreError(f"delete under {uri}: {len(errors)} objects not deleted, e.g. "
                                     f"{first.get('Key')}: {first.get('Code')}")

            self.call("delete", uri, run)
        return len(keys)
