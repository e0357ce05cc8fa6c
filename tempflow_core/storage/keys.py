"""Object keys: '/'-separated paths relative to a store's root that can never leave it."""

from __future__ import annotations

from tempflow_core.storage.errors import InvalidKey

MAX_KEY_BYTES = 1024  # S3's limit on key length


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


def folder_prefix(prefix: str) -> str:
    """'run/iter-1' -> 'run/iter-1/' ('' stays ''): a listing of 'run/iter-1' must not match
    'run/iter-10/...'."""
    p = validate_key(prefix, what="prefix", allow_empty=True)
    return p + "/" if p else ""
