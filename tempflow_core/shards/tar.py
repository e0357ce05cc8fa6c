"""A fast writer of webdataset tar shards, byte for byte what webdataset.TarWriter(mtime=0) writes.

Why not TarWriter itself: tarfile spends ~50 us of Python per member (header encoding, the
stream layer), which made the tar step most of a rollout stage's shard-writing time for the
tiny model (8 members per branch point). Short ASCII names get a fast ustar header built here;
any other name goes through tarfile. The tests check the shards byte for byte against TarWriter.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Any, Mapping

from tempflow_core.shards.errors import SchemaError
from tempflow_core.shards.manifest import ShardInfo
from tempflow_core.shards.schema import SHARD_PATTERN, check_sample_key, is_forbidden_member

_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_MTIME = 0  # fixed int mtime: same samples -> same shard bytes; a float mtime costs a PAX header per member
_OWNER = "bigdata"  # webdataset.TarWriter's defaults, so that the bytes match it exactly
_MODE = 0o444
_USTAR_TAIL = b"ustar\x0000" + _OWNER.encode().ljust(32, b"\0") * 2


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header webdataset.TarWriter (tarfile, PAX format) writes for a regular file."""
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or not name.isascii():
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, _MTIME, _MODE, _OWNER, _OWNER
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = (raw.ljust(100, b"\0") + b"%07o\0" % _MODE + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % _MTIME + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + _USTAR_TAIL).ljust(_BLOCK, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def check_writable(sample: Mapping[str, Any]) -> None:
    """A sample may be written only with a valid key and byte members that are not pickles."""
    key = check_sample_key(sample.get("__key__"), "sample __key__")  # type: ignore[arg-type]
    for member, value in sample.items():
        if member[:1] == "_":
            continue
        if "/" in member or not member or is_forbidden_member(member):
            raise SchemaError(f"sample {key!r}: member name {member!r} is not allowed (no '/', no pickle formats)")
        if type(value) is not bytes and not isinstance(value, (bytearray, memoryview)):
            raise SchemaError(f"sample {key!r}: member {member!r} must be bytes, got {type(value).__name__}")


class ShardFile:
    """One shard being written to a local file, hashed as it is written.

    The layout is webdataset's: members `{__key__}.{ext}` in sorted order per sample, keys
    starting with '_' skipped, fixed mtime, two zero blocks and padding to a 10 KiB record.
    """

    def __init__(self, index: int, folder: str, name_prefix: str = ""):
        self.name = name_prefix + SHARD_PATTERN.format(index)
        self.path = os.path.join(folder, self.name)
        self.file = open(self.path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0  # tar bytes written so far
        self.keys: list[str] = []  # __key__ of each sample, in order
        self.payload = 0  # member bytes without headers and padding

    def _emit(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def write(self, sample: dict[str, Any]) -> None:
        check_writable(sample)
        key = sample["__key__"]
        parts: list[bytes] = []
        for member in sorted(sample):
            if member[:1] == "_":
                continue
            data = bytes(sample[member])
            parts += (tar_header(f"{key}.{member}", len(data)), data, b"\0" * (-len(data) % _BLOCK))
            self.payload += len(data)
        self._emit(b"".join(parts))  # one write and one hash update per sample
        self.keys.append(key)

    def close(self) -> ShardInfo:
        """Finish the archive (end blocks, record padding) and return its manifest entry."""
        self._emit(b"\0" * (2 * _BLOCK))
        if self.nbytes % _RECORD:
            self._emit(b"\0" * (_RECORD - self.nbytes % _RECORD))
        self.file.close()
        return ShardInfo(self.name, self.sha.hexdigest(), self.nbytes, len(self.keys), self.keys)

    def abort(self) -> None:
        self.file.close()
