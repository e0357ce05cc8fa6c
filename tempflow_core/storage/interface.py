"""The object store interface: a flat namespace of objects under one root URI.

Stages of the pipeline talk only through this interface (URIs + small JSON manifests), so the
same code runs on a laptop (`LocalStore`, the default) and on a cluster (`S3Store`).
"""

from __future__ import annotations

import abc
import os
from typing import BinaryIO, Iterator

from tempflow_core.redaction import redact_uri
from tempflow_core.storage.errors import InvalidKey
from tempflow_core.storage.keys import validate_key


class ObjectStore(abc.ABC):
    """A flat namespace of immutable-ish objects under one root URI.

    Writes of a whole object are atomic for readers (local: temp file + os.replace; S3: PUT and
    completed multipart uploads are atomic by nature), which is what lets a stage publish its
    manifest last and be either complete or invisible. A missing object raises ObjectNotFound
    naming its URI.
    """

    uri: str  # the root, credential-free

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object is there (atomically); False when one was. Locks use it."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional put")

    def clean_temporary(self, prefix: str) -> int:
        """Remove what killed writers left under the folder `prefix` (temp files, unfinished
        uploads); only call it when no writer is active there. Returns how many were removed."""
        return 0

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

    def entries(self, prefix: str = "", limit: int = 1000) -> list[str]:
        """The first `limit` names directly under the folder `prefix`, sorted; a folder's name
        ends with '/'. This fallback lists everything under `prefix`; the local and S3 stores
        read one level (S3: one delimited page), cheap on a large store."""
        folder = prefix.rstrip("/") + "/" if prefix else ""
        names = sorted({k[len(folder):].split("/", 1)[0] + ("/" if "/" in k[len(folder):] else "")
                        for k in self.list(prefix)})
        return names[:limit]

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


def iter_chunks(f: BinaryIO, size: int = 8 << 20) -> Iterator[bytes]:
    """Read a stream in chunks (helper for hashing while copying)."""
    while True:
        chunk = f.read(size)
        if not chunk:
            return
        yield chunk
