"""Credentials out of the boto3 / urllib3 loggers that dump requests.

At DEBUG level botocore logs every prepared request (the Authorization header carries the access
key id, `X-Amz-Security-Token` the session token) and the canonical request it signs. A filter on
those loggers masks them with `redaction.redact_text`; it runs only for records that pass the
level check, so it costs nothing otherwise.
"""

from __future__ import annotations

import logging

from tempflow_core.redaction import redact_text

DUMPING_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.httpsession", "botocore.parsers",
                   "botocore.hooks", "botocore.credentials", "botocore.retryhandler", "botocore.utils",
                   "urllib3.connectionpool", "s3transfer.tasks", "s3transfer.futures", "s3transfer.upload")


class CredentialFilter(logging.Filter):
    """Rewrites a record whose message holds a credential: the given secret values, or any
    that `redact_text` recognises. Filters with the same secrets are equal (installed once)."""

    def __init__(self, secrets: frozenset[str]):
        super().__init__("tempflow-redact-credentials")
        self.secrets = secrets

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CredentialFilter) and other.secrets == self.secrets

    def __hash__(self) -> int:
        return hash(self.secrets)

    def __repr__(self) -> str:
        return f"CredentialFilter({len(self.secrets)} secrets)"

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to fix
            return True
        clean = redact_text(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def protect_logs(*secrets: str | None) -> None:
    """Install a filter masking `secrets` (and credential patterns) on the dumping loggers;
    idempotent for the same secrets. Logger filters are process-wide: call it in each process
    that builds a client (S3Store does, when it builds one)."""
    flt = CredentialFilter(frozenset(s for s in secrets if s and len(s) >= 4))
    for name in DUMPING_LOGGERS:
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
