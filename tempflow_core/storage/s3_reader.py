"""A streaming reader of one S3 object that survives a connection dropped mid-body.

botocore retries a request until its headers arrive, but not a body that breaks while it is
being read. This reader resumes such a read with a Range GET that carries If-Match on the first
ETag, so it never stitches together two versions of an object.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

from tempflow_core.storage.errors import StoreError, StoreUnavailable
from tempflow_core.storage.retry import client_error_code, describe, is_transient

if TYPE_CHECKING:
    from tempflow_core.storage.s3 import S3Store

log = logging.getLogger("tempflow.storage")


class S3ObjectReader(io.RawIOBase):
    """Raw (unbuffered) reader of `full_key` in the store's bucket; wrap it in a BufferedReader.

    Broken reads are resumed up to the store's `settings.retry.retries` times, waiting the
    policy's backoff (without jitter) between them; each GET itself runs under `store.call`.
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
                if client_error_code(exc)[0] == "PreconditionFailed":
                    raise StoreError(f"get {self._uri}: the object changed while it was being read") from None
                raise

        resp = self._store.call("get", self._uri, run)
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
        policy = self._store.settings.retry
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
                if not is_transient(exc):
                    raise StoreError(f"get {self._uri} failed: {self._store.redact(describe(exc))}") from exc
                failures += 1
                if failures >= policy.retries:
                    raise StoreUnavailable(f"get {self._uri} failed after {failures} resumed reads: "
                                           f"{self._store.redact(describe(exc))}") from exc
                log.warning("read of %s broke at byte %d (%s); resuming", self._uri, self._pos,
                            self._store.redact(describe(exc)))
                self._close_body()
                time.sleep(policy.delay(failures, jitter=False))
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
