"""Object store: one small interface over a local folder and S3 (AWS or any S3-compatible server).

Stages of the pipeline talk only through this interface (URIs + small JSON manifests), so the
same code runs on a laptop (`file:///...` or a plain path, the default) and on a cluster
(`s3://bucket/prefix`). Keys are '/'-separated paths relative to the store root; they are
validated so that no key can leave the root (`..`, absolute paths, symlinks on the local side).

Failures are made explicit: a missing object raises `ObjectNotFound`, a bad URI or key raises
`InvalidStoreURI` / `InvalidKey`, and an S3 operation that still fails after its retries raises
`StoreUnavailable`, always naming the object's URI. Credentials are never part of a URI, a repr,
a log line or an exception message written by this module.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("tempflow.storage")

T = TypeVar("T")

_TMP_MARK = ".tmp-"  # local temp files: ".{name}.tmp-{hex}"; never listed as objects
MAX_KEY_BYTES = 1024  # S3's limit on key length


# ---------------------------------------------------------------------------- errors
class StoreError(RuntimeError):
    """Base of every error raised by the object store."""


class InvalidStoreURI(StoreError, ValueError):
    """A store URI that cannot be opened (unknown scheme, credentials inside, bad bucket)."""


class InvalidKey(StoreError, ValueError):
    """A key that is malformed or would leave the store root."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The object does not exist (or the bucket does not)."""


class StoreUnavailable(StoreError):
    """An operation failed after all its retries (server errors, dropped connections)."""


# ---------------------------------------------------------------------------- URIs and keys
_SENSITIVE_QUERY = re.compile(r"(signature|credential|security-token|secret|token|password|key)", re.I)


def redact_uri(uri: str) -> str:
    """The URI with user info and credential-like query values replaced by '***'.

    Why: URIs end up in logs, manifests and error messages; a pasted `s3://AKIA..:secret@b/` or a
    presigned URL must never carry its secret there.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            name, sep, _ = item.partition("=")
            pairs.append(f"{name}=***" if sep and _SENSITIVE_QUERY.search(name) else item)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def validate_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """Return `key` normalised (no trailing '/'), or raise InvalidKey naming it.

    Refused: non-strings, absolute paths, backslashes, NUL, empty / '.' / '..' components. Why:
    keys come from prompt ids, stage names and URIs produced elsewhere; one `..` must not let a
    writer escape its run folder, on disk or in a bucket.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"{what} must be a string, got {type(key).__name__}")
    if key.startswith("/"):
        raise InvalidKey(f"{what} {key!r} is an absolute path; keys are relative to the store root")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(f"{what} {key!r} contains a backslash or NUL character")
    norm = key.rstrip("/")
    if not norm:
        if allow_empty:
            return ""
        raise InvalidKey(f"{what} is empty")
    for part in norm.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKey(f"{what} {key!r} has an empty, '.' or '..' path component")
    if len(norm.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"{what} {key[:60]!r}... is longer than {MAX_KEY_BYTES} bytes")
    return norm


def join_key(*parts: str) -> str:
    """Join key parts with '/', skipping empty ones; the result is validated."""
    joined = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return validate_key(joined, allow_empty=True)


def _folder(prefix: str) -> str:
    """Folder semantics for prefixes: 'run/iter-1' must not match 'run/iter-10/...'."""
    p = validate_key(prefix, what="prefix", allow_empty=True)
    return p + "/" if p else ""


# ---------------------------------------------------------------------------- interface
class ObjectStore(abc.ABC):
    """A flat namespace of immutable-ish objects under one root URI.

    Writes of a whole object are atomic for readers (local: temp file + os.replace; S3: PUT and
    completed multipart uploads are atomic by nature), which is what lets a stage publish its
    manifest last and be either complete or invisible.
    """

    uri: str  # the root, credential-free

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader (close it, or use it as a context manager)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under the folder `prefix` (recursive, sorted, relative to the store root)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`; returns how many were deleted."""

    @abc.abstractmethod
    def uri_for(self, key: str) -> str: ...

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def key_for(self, uri: str) -> str:
        """Inverse of `uri_for`; refuses a URI outside this store's root."""
        root = self.uri.rstrip("/") + "/"
        if not uri.startswith(root):
            raise InvalidKey(f"{redact_uri(uri)} is outside the store root {self.uri}")
        return validate_key(uri[len(root):])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# ---------------------------------------------------------------------------- local folder
class LocalStore(ObjectStore):
    """Objects as files under a root folder; the embedded default (no server to run)."""

    def __init__(self, root: str | os.PathLike[str]):
        path = Path(root).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        self.root = Path(os.path.normpath(path))
        self.uri = self.root.as_uri()

    def _path(self, key: str, *, what: str = "key", allow_empty: bool = False) -> Path:
        key = validate_key(key, what=what, allow_empty=allow_empty)
        path = self.root / key if key else self.root
        real_root = self.root.resolve()
        real = path.resolve()
        if real != real_root and real_root not in real.parents:
            raise InvalidKey(f"{what} {key!r} resolves outside the store root {self.uri} (symlink?)")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        def copy(dst: IO[bytes]) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 8 << 20)

        self._atomic_write(key, copy)

    def _atomic_write(self, key: str, write: Callable[[IO[bytes]], Any]) -> None:
        """Write to a temp file beside the target, fsync, then os.replace (atomic on POSIX)."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"object not found: {self.uri_for(key)}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object not found: {self.uri_for(key)}") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix, what="prefix", allow_empty=True)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    continue
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        base = self._path(prefix, what="prefix", allow_empty=True)
        if base != self.root and base.is_dir():
            shutil.rmtree(base, ignore_errors=True)  # left-over empty folders and temp files
        return len(keys)

    def uri_for(self, key: str) -> str:
        key = validate_key(key, allow_empty=True)
        return (self.root / key).as_uri() if key else self.uri


# ---------------------------------------------------------------------------- S3
class _Secret:
    """Holds a credential; its repr and str never show it."""

    __slots__ = ("value",)

    def __init__(self, value: str | None):
        self.value = value

    def __repr__(self) -> str:
        return "***" if self.value else "None"

    __str__ = __repr__


class _RedactCredentials(logging.Filter):
    """Scrubs credentials from records of the boto/urllib3 loggers that dump requests.

    Why: at DEBUG level botocore logs every prepared request (the Authorization header carries the
    access key id, `X-Amz-Security-Token` the session token) and the canonical request it signs.
    The filter runs only for records that pass the level check, so it costs nothing otherwise.
    """

    _PATTERNS = (
        re.compile(r"((?:X-Amz-)?Credential=)[^/\s,'\"&]+", re.I),
        re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,&]+", re.I),
    )

    def __init__(self) -> None:
        super().__init__("tempflow-redact-credentials")
        self.secrets: set[str] = set()

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        for pattern in self._PATTERNS:
            text = pattern.sub(r"\1***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_REDACTOR = _RedactCredentials()
_REDACTED_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.httpsession", "botocore.parsers",
                     "botocore.hooks", "botocore.credentials", "botocore.retryhandler", "botocore.utils",
                     "urllib3.connectionpool", "s3transfer.tasks", "s3transfer.futures", "s3transfer.upload")


def _protect_logs(*secrets: str | None) -> None:
    """Register credential values for redaction and install the filter on the dumping loggers."""
    _REDACTOR.secrets.update(s for s in secrets if s and len(s) >= 4)
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)


_S3_RETRYABLE_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeTooSkewed", "OperationAborted",
    "500", "502", "503", "504",
}
_S3_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def _client_error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: server errors, throttling, timeouts, dropped connections.

    Walks the cause/context chain because boto3's transfer manager wraps the real error
    (e.g. S3UploadFailedError around a ClientError 503).
    """
    import botocore.exceptions as bex
    import urllib3.exceptions as uex
    from http.client import HTTPException

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, bex.ClientError):
            code, status = _client_error_code(e)
            return code in _S3_RETRYABLE_CODES or status >= 500 or status == 429
        if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.ParamValidationError)):
            return False
        if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, bex.ResponseStreamingError,
                          bex.IncompleteReadError, uex.HTTPError, HTTPException, ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in ("RetriesExceededError", "S3UploadFailedError"):
            nxt = e.__cause__ or e.__context__
            if nxt is None:
                return True
            e = nxt
            continue
        e = e.__cause__ or e.__context__
    return False


class S3Store(ObjectStore):
    """Objects in an S3 bucket under an optional prefix; AWS or an S3-compatible endpoint.

    Args:
        bucket, prefix: where the store's root lives (`s3://bucket/prefix`).
        endpoint_url: S3-compatible server (default: the standard chain, e.g. AWS_ENDPOINT_URL_S3).
        region_name, aws_access_key_id, aws_secret_access_key, aws_session_token, profile_name:
            explicit credentials / region; left out, boto3's standard chain decides.
        max_attempts, retry_mode: botocore's own retries per request ('standard' or 'adaptive').
        retries, backoff, max_backoff: this store's outer loop around a whole operation, for what
            botocore does not retry (a connection dropped mid-body, a spent retry quota,
            a failed multipart transfer). Total tries per operation are bounded by
            retries * max_attempts.
        multipart_threshold, multipart_chunksize, max_concurrency: boto3 TransferConfig for files.
        create_bucket: create the bucket if missing (development servers).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile_name: str | None = None,
        max_attempts: int = 5,
        retry_mode: str = "standard",
        retries: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 16 << 20,
        max_concurrency: int = 4,
        addressing_style: str | None = None,
        create_bucket: bool = False,
    ):
        if not _BUCKET_NAME.match(bucket or ""):
            raise InvalidStoreURI(f"invalid S3 bucket name {bucket!r} (3-63 chars: a-z, 0-9, '.', '-')")
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {retry_mode!r}")
        if max_attempts < 1 or retries < 1:
            raise ValueError("max_attempts and retries must be >= 1")
        if endpoint_url is not None and "@" in urlsplit(endpoint_url).netloc:
            raise InvalidStoreURI(f"endpoint_url {redact_uri(endpoint_url)} carries credentials; "
                                  "pass them as options or through the standard AWS chain")
        self.bucket = bucket
        self.prefix = validate_key(prefix, what="prefix", allow_empty=True)
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self._access_key = _Secret(aws_access_key_id)
        self._secret_key = _Secret(aws_secret_access_key)
        self._session_token = _Secret(aws_session_token)
        self.profile_name = profile_name
        self.max_attempts = max_attempts
        self.retry_mode = retry_mode
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.addressing_style = addressing_style
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client_obj: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()
        _register_s3_store(self)
        if create_bucket:
            self.ensure_bucket()

    # -- pickling (DataLoader workers under spawn): no client, no lock
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client_obj"] = None
        state["_client_pid"] = -1
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _register_s3_store(self)

    def __repr__(self) -> str:
        ep = f", endpoint_url={redact_uri(self.endpoint_url)!r}" if self.endpoint_url else ""
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

        session = boto3.session.Session(
            aws_access_key_id=self._access_key.value,
            aws_secret_access_key=self._secret_key.value,
            aws_session_token=self._session_token.value,
            region_name=self.region_name,
            profile_name=self.profile_name,
        )
        s3cfg = {"addressing_style": self.addressing_style} if self.addressing_style else {}
        config = Config(
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=max(10, 2 * self.max_concurrency),
            s3=s3cfg or None,
        )
        creds = session.get_credentials()  # whichever the chain picked: env, profile, role, options
        frozen = creds.get_frozen_credentials() if creds is not None else None
        _protect_logs(self._access_key.value, self._secret_key.value, self._session_token.value,
                      *((frozen.access_key, frozen.secret_key, frozen.token) if frozen else ()))
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency)

    # -- keys
    def _full(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        key = validate_key(key, allow_empty=True)
        return f"{self.uri}/{key}" if key else self.uri

    # -- retries and error mapping
    def _scrub(self, text: str) -> str:
        for secret in (self._secret_key.value, self._session_token.value, self._access_key.value):
            if secret:
                text = text.replace(secret, "***")
        return _REDACTOR.redact(text)

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """Run `fn` with this store's outer retry loop; map errors to StoreError naming `uri`."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                self._raise_if_permanent(op, uri, exc)
                if attempt >= self.retries:
                    raise StoreUnavailable(
                        f"{op} {uri} failed after {attempt} attempts (each up to {self.max_attempts} "
                        f"botocore attempts): {self._scrub(_describe(exc))}") from exc
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning("transient error on %s %s (attempt %d/%d): %s; retrying in %.2f s",
                            op, uri, attempt, self.retries, self._scrub(_describe(exc)), delay)
                time.sleep(delay)

    def _raise_if_permanent(self, op: str, uri: str, exc: BaseException) -> None:
        import botocore.exceptions as bex

        if isinstance(exc, bex.ClientError):
            code, status = _client_error_code(exc)
            if code in _S3_NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                raise ObjectNotFound(f"object not found: {uri}") from None
            if code == "NoSuchBucket":  # not ObjectNotFound: a wrong bucket must not read as "stage absent"
                raise StoreError(f"bucket does not exist: s3://{self.bucket} (while {op} {uri})") from None
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            raise StoreError(f"{op} {uri}: no usable AWS credentials ({type(exc).__name__}); set them through "
                             "the standard chain (env, profile, instance role) or the store options") from None
        if not _is_transient(exc):
            raise StoreError(f"{op} {uri} failed: {self._scrub(_describe(exc))}") from exc

    # -- operations
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for development servers such as moto)."""
        import botocore.exceptions as bex

        def run() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except bex.ClientError as exc:
                code, status = _client_error_code(exc)
                if status != 404 and code not in ("NoSuchBucket", "404", "NotFound"):
                    raise
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                region = self.client.meta.region_name
                if region and region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
                try:
                    self.client.create_bucket(**kwargs)
                except bex.ClientError as exc2:
                    if _client_error_code(exc2)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._call("create bucket", f"s3://{self.bucket}", run)

    def put_bytes(self, key: str, data: bytes) -> None:
        full, uri = self._full(key), self.uri_for(key)
        if len(data) >= self.multipart_threshold:
            self._call("put", uri, lambda: self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, full, Config=self._transfer_config()))
        else:
            self._call("put", uri, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full, uri = self._full(key), self.uri_for(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"put {uri}: local file {os.fspath(path)!r} does not exist")
        self._call("put", uri, lambda: self.client.upload_file(
            os.fspath(path), self.bucket, full, Config=self._transfer_config()))

    def open_read(self, key: str) -> BinaryIO:
        raw = _S3ObjectReader(self, self._full(key), self.uri_for(key))
        return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except ObjectNotFound:
            return False

    def size(self, key: str) -> int:
        full, uri = self._full(key), self.uri_for(key)
        head = self._call("head", uri, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        folder = _folder(prefix)
        root = f"{self.prefix}/" if self.prefix else ""

        def run() -> list[str]:
            keys: list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + folder)
            for page in pages:
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", []))
            return keys

        return sorted(self._call("list", self.uri_for(folder.rstrip("/")), run))

    def delete(self, key: str) -> None:
        full, uri = self._full(key), self.uri_for(key)
        self._call("delete", uri, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[i:i + 1000]]
            uri = self.uri_for(prefix)

            def run(batch: list[dict[str, str]] = batch) -> None:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                errors = resp.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise StoreError(f"delete under {uri}: {len(errors)} objects not deleted, e.g. "
                                     f"{first.get('Key')}: {first.get('Code')}")

            self._call("delete", uri, run)
        return len(keys)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _S3ObjectReader(io.RawIOBase):
    """Streams one S3 object; a connection dropped mid-body resumes with a Range GET.

    Why: botocore retries a request until its headers arrive, but not a body that breaks
    while it is being read. The resumed GET carries If-Match on the first ETag, so a reader
    never stitches together two versions of an object.
    """

    def __init__(self, store: S3Store, full_key: str, uri: str):
        super().__init__()
        self._store, self._key, self._uri = store, full_key, uri
        self._pos = 0
        self._etag: str | None = None
        self._length = 0
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        import botocore.exceptions as bex

        def run() -> Any:
            kwargs: dict[str, Any] = {"Bucket": self._store.bucket, "Key": self._key}
            if self._etag is not None:
                kwargs["IfMatch"] = self._etag
                kwargs["Range"] = f"bytes={self._pos}-"
            try:
                return self._store.client.get_object(**kwargs)
            except bex.ClientError as exc:
                if _client_error_code(exc)[0] == "PreconditionFailed":
                    raise StoreError(f"get {self._uri}: the object changed while it was being read") from None
                raise

        resp = self._store._call("get", self._uri, run)
        if self._etag is None:
            self._etag = resp.get("ETag")
            self._length = int(resp["ContentLength"])
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._pos >= self._length:
            return 0
        want = min(len(buf), self._length - self._pos)
        failures = 0
        while True:
            try:
                data = self._body.read(want)
                if not data:
                    raise ConnectionError(f"connection closed at byte {self._pos} of {self._length}")
                break
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                if not _is_transient(exc):
                    raise StoreError(f"get {self._uri} failed: {self._store._scrub(_describe(exc))}") from exc
                failures += 1
                if failures >= self._store.retries:
                    raise StoreUnavailable(f"get {self._uri} failed after {failures} resumed reads: "
                                           f"{self._store._scrub(_describe(exc))}") from exc
                log.warning("read of %s broke at byte %d (%s); resuming", self._uri, self._pos,
                            self._store._scrub(_describe(exc)))
                self._close_body()
                time.sleep(min(self._store.max_backoff, self._store.backoff * 2 ** (failures - 1)))
                self._open()
        n = len(data)
        buf[:n] = data
        self._pos += n
        return n

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


# The webdataset gopen handler (tempflow_core.shards) finds the client settings of a bucket here,
# so that a shard URL opened in a DataLoader worker uses the same endpoint and credentials.
_S3_STORES: dict[str, S3Store] = {}


def _register_s3_store(store: S3Store) -> None:
    """Remember the bucket's client settings as a root store (prefix '') for gopen."""
    if store.prefix:
        root = S3Store.__new__(S3Store)
        root.__setstate__({**store.__getstate__(), "prefix": "", "uri": f"s3://{store.bucket}"})
        return  # __setstate__ registered the root clone
    _S3_STORES[store.bucket] = store


def s3_store_for_url(url: str) -> tuple[S3Store, str]:
    """(bucket-root store, key) for an `s3://bucket/key` URL.

    The store is the one last opened on that bucket in this process (same endpoint, credentials
    and retry settings), else one built from boto3's standard chain (env, profile, role).
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or "@" in parts.netloc:
        raise InvalidStoreURI(f"not a plain s3:// URL: {redact_uri(url)}")
    store = _S3_STORES.get(parts.netloc)
    if store is None:
        store = S3Store(parts.netloc)
    return store, validate_key(parts.path.lstrip("/"), what=f"key of {url}")


# ---------------------------------------------------------------------------- factory
def open_store(uri: str | os.PathLike[str] | ObjectStore, **options: Any) -> ObjectStore:
    """Open `file:///abs/path`, a plain path (the default), or `s3://bucket/prefix`.

    Options go to the store (see `S3Store` for S3; `LocalStore` takes none). Raises
    InvalidStoreURI naming the (redacted) URI for an unknown scheme, credentials in the URI,
    or a `file://` URI with a remote host.
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
        prefix = parts.path.lstrip("/")
        try:
            prefix = validate_key(prefix, what="S3 prefix", allow_empty=True)
        except InvalidKey as exc:
            raise InvalidStoreURI(f"S3 URI {uri!r}: {exc}") from None
        return S3Store(parts.netloc, prefix, **options)
    raise InvalidStoreURI(f"unsupported store URI scheme {scheme!r} in {redact_uri(uri)}; "
                          "use file:///abs/path, a plain path, or s3://bucket/prefix")


def _local(path: str, options: dict[str, Any]) -> LocalStore:
    if options:
        raise TypeError(f"a local store takes no options, got {sorted(options)}")
    if "\x00" in path:
        raise InvalidStoreURI("local store path contains a NUL character")
    return LocalStore(path)


def iter_chunks(f: BinaryIO, size: int = 8 << 20) -> Iterator[bytes]:
    """Read a stream in chunks (helper for hashing while copying)."""
    while True:
        chunk = f.read(size)
        if not chunk:
            return
        yield chunk
