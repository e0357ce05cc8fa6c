"""What an S3 store needs besides its bucket: endpoint and client settings, and credentials.

Both are frozen values: a store is built from (bucket, prefix, S3Settings, S3Credentials) and
pickles as such, so a DataLoader worker started by spawn rebuilds the same client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tempflow_core.redaction import redact_uri
from tempflow_core.storage.errors import InvalidStoreURI
from tempflow_core.storage.retry import RetryPolicy

RETRY_MODES = ("standard", "adaptive", "legacy")


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3 endpoint and how hard to try. Left at None, boto3's standard chain
    (environment, profile, instance metadata) decides.

    Attributes:
        endpoint_url: S3-compatible server, e.g. 'http://127.0.0.1:9000' (default: the chain,
            e.g. AWS_ENDPOINT_URL_S3). Must carry no credentials.
        region_name, profile_name: region and named profile of the boto3 session.
        addressing_style: 'path' or 'virtual' bucket addressing (None: botocore decides).
        max_attempts: botocore's own tries per request (>= 1).
        retry_mode: botocore's retry mode, 'standard' or 'adaptive'.
        retry: the store's outer loop around a whole operation (see RetryPolicy).
        connect_timeout, read_timeout: seconds per connection / per socket read.
        multipart_threshold, multipart_chunksize: bytes; objects from the threshold up are
            uploaded in parts of the chunk size (boto3 TransferConfig).
        max_concurrency: parallel part uploads per transfer.
    """

    endpoint_url: str | None = None
    region_name: str | None = None
    profile_name: str | None = None
    addressing_style: str | None = None
    max_attempts: int = 5
    retry_mode: str = "standard"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 4

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {self.retry_mode!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.endpoint_url is not None and "@" in urlsplit(self.endpoint_url).netloc:
            raise InvalidStoreURI(f"endpoint_url {redact_uri(self.endpoint_url)} carries credentials; "
                                  "pass them as options or through the standard AWS chain")


@dataclass(frozen=True, repr=False)
class S3Credentials:
    """Explicit credentials; all None (the default) lets boto3's standard chain pick them.
    Their repr and str never show a value."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    def values(self) -> tuple[str, ...]:
        """The values that are set (for log redaction)."""
        return tuple(v for v in (self.access_key_id, self.secret_access_key, self.session_token) if v)

    def __repr__(self) -> str:
        return "S3Credentials(***)" if self.values() else "S3Credentials(None)"

    __str__ = __repr__
