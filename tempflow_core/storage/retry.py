"""Retry policy of the S3 store: which failures are worth another try, and how long to wait.

botocore retries each request itself (`S3Settings.max_attempts`); this policy is the store's
outer loop around a whole operation, for what botocore does not retry: a connection dropped
mid-body, a spent retry quota, a failed multipart transfer. Total tries per operation are
bounded by `retries * max_attempts`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# S3 error codes (and HTTP statuses as codes) after which a retry may succeed.
RETRYABLE_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeTooSkewed", "OperationAborted",
    "500", "502", "503", "504",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for the store's outer retry loop.

    Attributes:
        retries: tries per operation (>= 1), each made of up to `max_attempts` botocore attempts.
        backoff: seconds before the 2nd try; doubled per try.
        max_backoff: cap of one wait, seconds.
    """

    retries: int = 4
    backoff: float = 0.2
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ValueError(f"retries must be >= 1, got {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {self.backoff}, {self.max_backoff}")

    def delay(self, failures: int, *, jitter: bool = True) -> float:
        """Seconds to wait after the `failures`-th failure (1-based): backoff * 2^(failures-1),
        capped, times a uniform factor in [0.5, 1) with jitter (so parallel workers spread out)."""
        base = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
        return base * (0.5 + random.random() / 2) if jitter else base


def client_error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError ('' and 0 when absent)."""
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
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
            code, status = client_error_code(e)
            return code in RETRYABLE_CODES or status >= 500 or status == 429
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


def is_retryable_failure(exc: BaseException) -> bool:
    """Whether a failed pipeline task may succeed when run again: the store gave up on a
    transient fault (`StoreUnavailable`), or the fault itself is transient (`is_transient`:
    5xx, throttling, timeouts, dropped connections). Everything else (a bad key, a schema or
    integrity error, a missing object, a config error) fails the same way every time.
    """
    from tempflow_core.storage.errors import StoreUnavailable

    return isinstance(exc, StoreUnavailable) or is_transient(exc)


def describe(exc: BaseException) -> str:
    """'TypeName: message' of an exception (before redaction)."""
    return f"{type(exc).__name__}: {exc}"
