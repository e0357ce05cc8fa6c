"""The errors of the object store: every one names the object's (credential-free) URI."""

from __future__ import annotations


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
