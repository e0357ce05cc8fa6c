"""The local store: objects as files under a root folder (the default; no server to run)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable

from tempflow_core.storage.errors import InvalidKey, ObjectNotFound
from tempflow_core.storage.interface import ObjectStore
from tempflow_core.storage.keys import validate_key

_TMP_MARK = ".tmp-"  # temp files: ".{name}.tmp-{hex}" beside their target; never listed as objects


class LocalStore(ObjectStore):
    """Objects as files under a root folder.

    A write goes to a temp file beside its target, is fsynced, then os.replace'd (atomic on
    POSIX). Keys that resolve outside the root (through a symlink) are refused.
    """

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

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write a temp file, then hard-link it to the key: link() fails if the key exists, and
        a reader never sees a partly written object."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def clean_temporary(self, prefix: str) -> int:
        """Delete the hidden temp files (".name.tmp-...") of writes a killed process left."""
        base = self._path(prefix, what="prefix", allow_empty=True)
        n = 0
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    Path(dirpath, name).unlink(missing_ok=True)
                    n += 1
        return n

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

    def entries(self, prefix: str = "", limit: int = 1000) -> list[str]:
        base = self._path(prefix, what="prefix", allow_empty=True)
        if not base.is_dir():
            return []
        with os.scandir(base) as it:
            names = [e.name + ("/" if e.is_dir() else "") for e in it
                     if not (e.name.startswith(".") and _TMP_MARK in e.name)]
        return sorted(names)[:limit]

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
