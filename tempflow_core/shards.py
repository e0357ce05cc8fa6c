"""Rollout shards: a versioned webdataset schema on the object store, manifests and scores.

A rollout stage writes, under its prefix:

    shard-000000.tar ...   webdataset shards, one sample per branch point (or plain trajectory)
    embeds.safetensors     PromptEmbeds (embeds, pooled, neg_embeds, neg_pooled) + sigmas, once
    prompts.json           prompt texts and ids, rollout kind and counters
    manifest.json          written LAST: schema version, sha256/size/sample count of every object,
                           producing checkpoint URI, config hash; without it the output does not exist

One branch-point sample (`__key__` = BranchPoint.group_id, e.g. `000003_k04`):

    meta.json              kind, step k, sigma, sigma_next, prompt id/index, group id, child keys, seeds
    tensors.safetensors    x_k [C,H,W] (once), x_next [K,C,H,W], log_prob [K], seeds [K], final_latents [K,C,H,W]
    c00.png .. cKK.png     each child's decoded image (lossless)

One plain-trajectory sample (`__key__` = Trajectory.key): meta.json, tensors.safetensors
(states [T+1,C,H,W], log_probs [T]) and image.png.

Tensors go through safetensors (bf16 round-trips bit-identically); nothing is pickled, and a
sample holding a pickle-based member (.pth/.pt/.pickle/.pkl/.pyd) is refused when read. Rewards
and advantages live beside the shards as small manifest-backed score objects keyed by the child
keys (`write_scores`), so scoring never rewrites a shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import struct
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
import webdataset as wds
from webdataset.gopen import gopen as _wds_gopen
from webdataset.gopen import gopen_schemes as _wds_gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from .storage import (
    ObjectNotFound,
    ObjectStore,
    StoreError,
    iter_chunks,
    join_key,
    open_store,
    redact_uri,
    s3_store_for_url,
    validate_key,
)

if TYPE_CHECKING:  # at run time imported where needed: rollout pulls in diffusers (~2 s), which a
    # DataLoader worker or a reward task that only streams samples does not need
    from .policy import PromptEmbeds
    from .rollout import BranchPoint, RolloutBatch, Trajectory

log = logging.getLogger("tempflow.shards")

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMBEDS_NAME = "embeds.safetensors"
PROMPTS_NAME = "prompts.json"
SCORES_NAME = "scores.safetensors"
SHARD_PATTERN = "shard-{:06d}.tar"
FORBIDDEN_EXTENSIONS = frozenset({"pth", "pt", "pickle", "pkl", "pyd"})
_SAMPLE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SECRET_FIELD = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)
_TAR_MTIME = 0  # fixed int mtime: same samples -> same shard bytes; a float mtime costs a PAX header per member
_SPOOL_BYTES = 64 << 20  # shards up to this size are verified in memory, larger ones spill to disk

StoreLike = ObjectStore | str | os.PathLike


# ---------------------------------------------------------------------------- errors
class ShardError(StoreError):
    """Base of the shard-format errors."""


class ShardIntegrityError(ShardError):
    """An object's bytes differ from its manifest entry (sha256 or size); names the object."""


class UnsafeMemberError(ShardError):
    """A sample holds a pickle-based member; reading it could execute code."""


class SchemaError(ShardError, ValueError):
    """A sample, manifest or batch does not follow the schema; names the field."""


class StageNotFound(ShardError, ObjectNotFound):
    """No manifest at the prefix: the stage never ran or was interrupted."""


class StageExists(ShardError):
    """A complete stage output (manifest present) would be overwritten."""


# ---------------------------------------------------------------------------- manifest
@dataclass
class ObjectInfo:
    """One object of a stage output, relative to the stage prefix."""

    name: str
    sha256: str
    bytes: int


@dataclass
class ShardInfo(ObjectInfo):
    samples: int = 0  # webdataset samples (branch points or trajectories)
    keys: list[str] = field(default_factory=list)  # their __key__s, in order


@dataclass
class Manifest:
    """What a stage produced and from what; written last, so its presence means 'complete'."""

    kind: str  # "rollouts" | "scores"
    schema_version: int = SCHEMA_VERSION
    rollout_kind: str | None = None  # "branch" | "plain" for rollouts
    num_samples: int = 0  # webdataset samples
    num_keys: int = 0  # child / trajectory keys: what rewards and advantages refer to
    shards: list[ShardInfo] = field(default_factory=list)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    checkpoint_uri: str | None = None
    config_hash: str | None = None
    producer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> bytes:
        try:
            return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"manifest is not JSON-serialisable (producer/extra fields?): {exc}") from None

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> "Manifest":
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaError(f"manifest {uri} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SchemaError(f"manifest {uri} must be a JSON object")
        version = raw.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise SchemaError(f"manifest {uri}: field 'schema_version' is missing or invalid ({version!r})")
        if version > SCHEMA_VERSION:
            raise SchemaError(f"manifest {uri} has schema_version {version}; this tempflow reads up to "
                              f"{SCHEMA_VERSION} (upgrade tempflow)")
        try:
            shards = [ShardInfo(**_check_object(s, uri, "shards")) for s in raw.get("shards", [])]
            objects = {k: ObjectInfo(**_check_object(v, uri, f"objects.{k}")) for k, v in raw.get("objects", {}).items()}
            kw = {k: raw[k] for k in ("kind", "rollout_kind", "num_samples", "num_keys", "checkpoint_uri",
                                       "config_hash", "producer", "extra", "created_at") if k in raw}
            return cls(schema_version=version, shards=shards, objects=objects, **kw)
        except TypeError as exc:
            raise SchemaError(f"manifest {uri}: unexpected or missing field ({exc})") from None


def _check_object(entry: Any, uri: str, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise SchemaError(f"manifest {uri}: {where} entry must be an object")
    name = entry.get("name")
    if not isinstance(name, str) or "/" in name:
        raise SchemaError(f"manifest {uri}: {where} entry has an invalid 'name' {name!r}")
    validate_key(name, what=f"manifest {uri} object name")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        raise SchemaError(f"manifest {uri}: {where} '{name}' has an invalid 'sha256'")
    if not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0:
        raise SchemaError(f"manifest {uri}: {where} '{name}' has an invalid 'bytes'")
    return entry


def manifest_key(prefix: str) -> str:
    return join_key(prefix, MANIFEST_NAME)


def read_manifest(store: StoreLike, prefix: str) -> Manifest | None:
    """The manifest of the stage output at `prefix`, or None when there is none (never ran or
    interrupted: shards without a manifest do not count)."""
    store = open_store(store)
    key = manifest_key(prefix)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    return Manifest.from_json(data, store.uri_for(key))


def require_manifest(store: StoreLike, prefix: str, kind: str | None = None) -> Manifest:
    """Like read_manifest, but a missing manifest raises StageNotFound naming the URI."""
    store = open_store(store)
    m = read_manifest(store, prefix)
    if m is None:
        raise StageNotFound(f"no complete stage output at {store.uri_for(join_key(prefix))}: {MANIFEST_NAME} is "
                            "missing (the stage never ran or was interrupted before its manifest)")
    if kind is not None and m.kind != kind:
        raise SchemaError(f"{store.uri_for(manifest_key(prefix))} describes a {m.kind!r} output, expected {kind!r}")
    return m


def stage_complete(store: StoreLike, prefix: str) -> bool:
    """Whether a stage output exists at `prefix` (its manifest is present and readable)."""
    return read_manifest(store, prefix) is not None


def write_manifest(store: StoreLike, prefix: str, manifest: Manifest) -> str:
    """Publish the manifest (atomic on both stores); returns its URI. Call it last."""
    store = open_store(store)
    key = manifest_key(prefix)
    store.put_bytes(key, manifest.to_json())
    return store.uri_for(key)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _scrub(value: Any, path: str = "producer") -> Any:
    """Copy of producer/extra metadata with credentials removed (URIs redacted, secret-like
    field names blanked): manifests are shared and logged, credentials must never land there."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"{path}: keys must be strings, got {k!r}")
            if _SECRET_FIELD.search(k):
                log.warning("%s.%s looks like a credential; it is not written to the manifest", path, k)
                out[k] = "***"
            else:
                out[k] = _scrub(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_scrub(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def _provenance(producer: Mapping[str, Any] | None, checkpoint_uri: str | None,
                config_hash: str | None) -> tuple[dict[str, Any], str | None, str | None]:
    prod = _scrub(dict(producer or {}))
    ckpt = checkpoint_uri or prod.get("checkpoint_uri") or prod.get("checkpoint")
    cfg = config_hash or prod.get("config_hash") or prod.get("config_digest")
    return prod, (redact_uri(str(ckpt)) if ckpt else None), (str(cfg) if cfg else None)


def _prepare_prefix(store: ObjectStore, prefix: str, overwrite: bool) -> None:
    """Refuse to replace a complete stage unless asked; when asked, hide it first."""
    key = manifest_key(prefix)
    if store.exists(key):
        if not overwrite:
            raise StageExists(f"{store.uri_for(key)} exists: the stage output is complete; pass overwrite=True "
                              "to replace it")
        store.delete(key)  # from here on readers see no stage, until the new manifest lands


# ---------------------------------------------------------------------------- encoding
def _check_key(key: str, field_name: str) -> str:
    if not isinstance(key, str) or not _SAMPLE_KEY.match(key):
        raise SchemaError(f"{field_name} {key!r} is not a valid sample key: use letters, digits, '_' and '-' "
                          "(no dots: webdataset splits member names at the first dot)")
    return key


_NUMPY_SAFE = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.uint8, torch.bool}


def _tensor_bytes(tensors: Mapping[str, Any], where: str) -> bytes:
    """safetensors bytes of CPU copies of `tensors`.

    The bytes are the same safetensors format either way; the numpy writer is used when every
    dtype has a numpy twin because it is about 3x faster per call, the torch writer otherwise
    (bfloat16). Tensors sharing storage are cloned (safetensors.torch refuses them).
    """
    clean: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise SchemaError(f"{where}: field {name!r} must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[name] = t
    meta = {"schema_version": str(SCHEMA_VERSION)}
    if all(t.dtype in _NUMPY_SAFE for t in clean.values()):
        return safetensors.numpy.save({k: t.numpy() for k, t in clean.items()}, metadata=meta)
    return safetensors.torch.save(clean, metadata=meta)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(image: Any, where: str, level: int) -> bytes:
    """Lossless PNG of a uint8 image, written directly with zlib (filter 'None' per row).

    Why not PIL: for the small images of a rollout, PIL's per-call overhead is several times the
    compression itself, and PNG encoding is most of a shard's writing time. Any PNG reader
    (PIL included, see the tests) decodes the result bit-exactly.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise SchemaError(f"{where}: image must be uint8 [H, W] or [H, W, 1-4], got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    rows = np.empty((h, 1 + w * channels), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = arr.reshape(h, w * channels)
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _png_chunk(b"IEND", b"")))


def auto_png_level(image: Any) -> int:
    """zlib level for a batch's PNGs, judged on one of its images: 1 when it compresses by at
    least 10%, else 0 (stored). Why: images of the random or barely trained tiny model are
    noise-like; deflating them saves nothing and costs ~10x the rest of their encoding."""
    raw = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()
    return 1 if len(zlib.compress(raw, 1)) < 0.9 * len(raw) else 0


def _json_bytes(obj: Any, where: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{where}: not JSON-serialisable: {exc}") from None


def encode_branch_point(bp: BranchPoint, *, images: bool = True, png_level: int = 1) -> dict[str, Any]:
    """One webdataset sample (member name -> bytes) for a branch point."""
    key = _check_key(bp.group_id, "BranchPoint.group_id")
    where = f"branch point {key}"
    k = int(bp.x_next.shape[0])
    for name in ("log_prob", "seeds", "final_latents"):
        t = getattr(bp, name)
        if not isinstance(t, torch.Tensor) or t.shape[0] != k:
            raise SchemaError(f"{where}: field {name!r} must have {k} rows (one per child)")
    meta = {
        "schema_version": SCHEMA_VERSION, "kind": "branch", "key": key, "group_id": key,
        "prompt_id": bp.prompt_id, "prompt_index": int(bp.prompt_index), "step": int(bp.step),
        "sigma": float(bp.sigma), "sigma_next": float(bp.sigma_next), "child_keys": bp.child_keys,
        "seeds": [int(s) for s in bp.seeds.tolist()],
    }
    sample: dict[str, Any] = {
        "__key__": key,
        "meta.json": _json_bytes(meta, where),
        "tensors.safetensors": _tensor_bytes({"x_k": bp.x_k, "x_next": bp.x_next, "log_prob": bp.log_prob,
                                              "seeds": bp.seeds, "final_latents": bp.final_latents}, where),
    }
    if images and bp.images is not None:
        if len(bp.images) != k:
            raise SchemaError(f"{where}: field 'images' has {len(bp.images)} rows, expected {k}")
        for j in range(k):
            sample[f"c{j:02d}.png"] = _png(bp.images[j], f"{where} child {j}", png_level)
    return sample


def encode_trajectory(tr: Trajectory, *, images: bool = True, png_level: int = 1) -> dict[str, Any]:
    """One webdataset sample for a plain SDE trajectory."""
    key = _check_key(tr.key, "Trajectory.key")
    where = f"trajectory {key}"
    meta = {
        "schema_version": SCHEMA_VERSION, "kind": "plain", "key": key, "group_id": tr.group_id,
        "prompt_id": tr.prompt_id, "prompt_index": int(tr.prompt_index), "member": int(tr.member),
        "seed": int(tr.seed),
    }
    sample: dict[str, Any] = {
        "__key__": key,
        "meta.json": _json_bytes(meta, where),
        "tensors.safetensors": _tensor_bytes({"states": tr.states, "log_probs": tr.log_probs}, where),
    }
    if images and tr.image is not None:
        sample["image.png"] = _png(tr.image, where, png_level)
    return sample


def _encode_embeds(batch: RolloutBatch) -> bytes:
    e = batch.embeds
    return _tensor_bytes({"embeds": e.embeds, "pooled": e.pooled, "neg_embeds": e.neg_embeds,
                          "neg_pooled": e.neg_pooled, "sigmas": batch.sigmas}, "RolloutBatch.embeds")


# ---------------------------------------------------------------------------- writing
_TAR_BLOCK, _TAR_RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_TAR_OWNER = "bigdata"  # webdataset.TarWriter's defaults, so that the bytes match it exactly
_TAR_MODE = 0o444
_USTAR_TAIL = b"ustar\x0000" + _TAR_OWNER.encode().ljust(32, b"\0") * 2


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte header webdataset.TarWriter (tarfile, PAX format) writes for a regular file.

    Why not TarWriter itself: tarfile spends ~50 us of Python per member (header encoding, the
    stream layer), which made the tar step most of a rollout stage's shard-writing time for the
    tiny model (8 members per branch point). Short ASCII names get this fast ustar header; any
    other name goes through tarfile. The tests check the shards byte for byte against TarWriter.
    """
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or not name.isascii():
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, _TAR_MTIME, _TAR_MODE, _TAR_OWNER, _TAR_OWNER
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = (raw.ljust(100, b"\0") + b"%07o\0" % _TAR_MODE + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % _TAR_MTIME + b" " * 8 + tarfile.REGTYPE + b"\0" * 100 + _USTAR_TAIL).ljust(_TAR_BLOCK, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


class _OpenShard:
    """One shard being written to a local temp file, hashed as it is written.

    The layout is webdataset's: members `{__key__}.{ext}` in sorted order per sample, keys
    starting with '_' skipped, fixed mtime, two zero blocks and padding to a 10 KiB record.
    """

    def __init__(self, index: int, folder: str):
        self.name = SHARD_PATTERN.format(index)
        self.path = os.path.join(folder, self.name)
        self.file = open(self.path, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.keys: list[str] = []
        self.payload = 0

    def _emit(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def write(self, sample: dict[str, Any]) -> None:
        _check_writable(sample)
        key = sample["__key__"]
        parts: list[bytes] = []
        for member in sorted(sample):
            if member[:1] == "_":
                continue
            data = bytes(sample[member])
            parts += (_tar_header(f"{key}.{member}", len(data)), data, b"\0" * (-len(data) % _TAR_BLOCK))
            self.payload += len(data)
        self._emit(b"".join(parts))  # one write and one hash update per sample
        self.keys.append(key)

    def close(self) -> ShardInfo:
        self._emit(b"\0" * (2 * _TAR_BLOCK))
        if self.nbytes % _TAR_RECORD:
            self._emit(b"\0" * (_TAR_RECORD - self.nbytes % _TAR_RECORD))
        self.file.close()
        return ShardInfo(self.name, self.sha.hexdigest(), self.nbytes, len(self.keys), self.keys)

    def abort(self) -> None:
        self.file.close()


def _check_writable(sample: Mapping[str, Any]) -> None:
    """A sample may be written only with a valid key and byte members that are not pickles."""
    key = _check_key(sample.get("__key__"), "sample __key__")  # type: ignore[arg-type]
    for member, value in sample.items():
        if member[:1] == "_":
            continue
        if "/" in member or not member or not FORBIDDEN_EXTENSIONS.isdisjoint(member.lower().split(".")):
            raise SchemaError(f"sample {key!r}: member name {member!r} is not allowed (no '/', no pickle formats)")
        if type(value) is not bytes and not isinstance(value, (bytearray, memoryview)):
            raise SchemaError(f"sample {key!r}: member {member!r} must be bytes, got {type(value).__name__}")


def _upload(store: ObjectStore, key: str, path: str) -> None:
    try:
        store.put_file(key, path)
    finally:
        os.unlink(path)


def write_shards(
    samples: Iterable[dict[str, Any]],
    store: StoreLike,
    prefix: str,
    *,
    samples_per_shard: int = 32,
    max_shard_bytes: int | None = None,
    tmp_dir: str | None = None,
    upload_workers: int = 2,
) -> list[ShardInfo]:
    """Write encoded samples as tar shards to a local temp folder and upload each finished shard.

    Why not ShardWriter: it opens (and posts) a shard before the first sample, so a writer with
    nothing to write still uploads an empty shard (webdataset #376). Here a shard is opened by
    its first sample, so no empty shard exists. The bytes are those webdataset.TarWriter writes
    (see `_tar_header`). Uploads run in a small thread pool while the next shard is being
    encoded; all are awaited (or the error raised) before this returns. Writes no manifest.
    """
    store = open_store(store)
    with tempfile.TemporaryDirectory(prefix="tempflow-shards-", dir=tmp_dir) as folder, \
            cf.ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        return _write_shards(samples, store, prefix, folder, pool, samples_per_shard, max_shard_bytes)


def _write_shards(samples: Iterable[dict[str, Any]], store: ObjectStore, prefix: str, folder: str,
                  pool: cf.Executor, samples_per_shard: int, max_shard_bytes: int | None) -> list[ShardInfo]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    validate_key(prefix, what="stage prefix")
    infos: list[ShardInfo] = []
    futures: list[cf.Future[None]] = []
    shard: _OpenShard | None = None
    try:
        for sample in samples:
            if shard is None:
                shard = _OpenShard(len(infos), folder)
            shard.write(sample)
            if len(shard.keys) >= samples_per_shard or (max_shard_bytes and shard.payload >= max_shard_bytes):
                infos.append(shard.close())
                futures.append(pool.submit(_upload, store, join_key(prefix, shard.name), shard.path))
                shard = None
        if shard is not None:
            infos.append(shard.close())
            futures.append(pool.submit(_upload, store, join_key(prefix, shard.name), shard.path))
            shard = None
        for fut in futures:
            fut.result()
    except BaseException:
        if shard is not None:
            shard.abort()
        for fut in futures:
            fut.cancel()
        raise
    return infos


def _put_object(store: ObjectStore, prefix: str, name: str, data: bytes) -> ObjectInfo:
    store.put_bytes(join_key(prefix, name), data)
    return ObjectInfo(name, hashlib.sha256(data).hexdigest(), len(data))


def _first_images(items: Sequence[Any]) -> Iterator[np.ndarray]:
    for item in items[:1]:
        many = hasattr(item, "child_keys")  # a BranchPoint: K images
        images = getattr(item, "images", None) if many else getattr(item, "image", None)
        if images is not None and len(images):
            yield images[0] if many else images


def _check_unique_keys(batch: RolloutBatch) -> list[Any]:
    if batch.kind == "branch":
        items: list[Any] = list(batch.branch_points)
        keys = [bp.group_id for bp in items]
    elif batch.kind == "plain":
        items = list(batch.trajectories)
        keys = [tr.key for tr in items]
    else:
        raise SchemaError(f"RolloutBatch.kind must be 'branch' or 'plain', got {batch.kind!r}")
    dup = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if dup:
        raise SchemaError(f"RolloutBatch has duplicate sample keys {dup[:5]}; keys must be unique")
    if len(batch.prompts) != len(batch.prompt_ids):
        raise SchemaError("RolloutBatch.prompts and prompt_ids differ in length")
    return items


def write_rollouts(
    batch: RolloutBatch,
    store: StoreLike,
    prefix: str,
    *,
    samples_per_shard: int = 32,
    max_shard_bytes: int | None = None,
    producer: Mapping[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    config_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
    images: bool = True,
    png_level: int | None = None,
    overwrite: bool = False,
    tmp_dir: str | None = None,
    upload_workers: int = 2,
) -> Manifest:
    """Write a rollout stage's output under `prefix` and publish its manifest last.

    Args:
        samples_per_shard: max webdataset samples (branch points / trajectories) per shard. Keep
            the shard count >= learner ranks x DataLoader workers, or some readers get nothing.
        producer: provenance, e.g. {"checkpoint_uri", "config_hash", "iteration", "run"};
            secret-like fields are blanked and URIs redacted.
        png_level: zlib level of the PNGs (0-9); None picks 1 or 0 from the first image
            (see auto_png_level).
        overwrite: replace a complete output (its manifest is removed first); else StageExists.

    Returns the manifest. If anything fails, no manifest is written and the stage stays absent.
    """
    store = open_store(store)
    prefix = validate_key(prefix, what="stage prefix")
    items = _check_unique_keys(batch)
    prod, ckpt, cfg = _provenance(producer, checkpoint_uri, config_hash)
    _prepare_prefix(store, prefix, overwrite)
    encode: Callable[..., dict[str, Any]] = encode_branch_point if batch.kind == "branch" else encode_trajectory
    if png_level is None:
        first = next((im for im in _first_images(items)), None)
        png_level = auto_png_level(first) if first is not None else 1
    samples = (encode(item, images=images, png_level=png_level) for item in items)
    prompts = {"schema_version": SCHEMA_VERSION, "kind": batch.kind, "prompts": list(batch.prompts),
               "prompt_ids": list(batch.prompt_ids), "forward_calls": int(batch.forward_calls), "nfe": int(batch.nfe)}
    side = {"embeds": (EMBEDS_NAME, _encode_embeds(batch)),
            "prompts": (PROMPTS_NAME, _json_bytes(prompts, "RolloutBatch.prompts"))}
    with tempfile.TemporaryDirectory(prefix="tempflow-shards-", dir=tmp_dir) as folder, \
            cf.ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        pending = {k: pool.submit(_put_object, store, prefix, name, data) for k, (name, data) in side.items()}
        shards = _write_shards(samples, store, prefix, folder, pool, samples_per_shard, max_shard_bytes)
        objects = {k: fut.result() for k, fut in pending.items()}
    manifest = Manifest(
        kind="rollouts", rollout_kind=batch.kind, num_samples=len(items), num_keys=len(batch.sample_keys()),
        shards=shards, objects=objects, checkpoint_uri=ckpt, config_hash=cfg, producer=prod,
        extra=_scrub(dict(extra or {}), "extra"), created_at=_now(),
    )
    uri = write_manifest(store, prefix, manifest)
    log.info("wrote %d samples (%d keys) in %d shards, %d bytes, to %s", manifest.num_samples, manifest.num_keys,
             len(shards), sum(s.bytes for s in shards), uri)
    return manifest


# ---------------------------------------------------------------------------- reading
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """webdataset gopen handler for s3:// over boto3 (retries, resumed reads); no `pipe:aws`."""
    if not mode.startswith("r"):
        raise ValueError(f"{redact_uri(url)}: the s3 gopen handler only reads; write shards with write_shards")
    store, key = s3_store_for_url(url)
    return store.open_read(key)


def register_s3_gopen() -> None:
    """Install the s3:// handler in webdataset's gopen table (done at import of this module, so
    DataLoader workers started by spawn get it too)."""
    _wds_gopen_schemes["s3"] = _gopen_s3


register_s3_gopen()


def shard_urls(store: StoreLike, prefix: str, manifest: Manifest | None = None) -> list[str]:
    """URLs of the shards of a complete stage output, in manifest order."""
    store = open_store(store)
    manifest = manifest or require_manifest(store, prefix)
    return [store.uri_for(join_key(prefix, s.name)) for s in manifest.shards]


def _verified_stream(url: str, sha256: str | None, size: int | None) -> BinaryIO:
    """Open a shard URL (webdataset gopen: file:// or our s3 handler) and check it against its
    manifest entry before any sample is used. Verified bytes are spooled (memory, then disk)."""
    src = _wds_gopen(url, "rb")
    if sha256 is None:
        return src
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
    digest, n = hashlib.sha256(), 0
    try:
        with src:
            for chunk in iter_chunks(src, 4 << 20):
                digest.update(chunk)
                spool.write(chunk)
                n += len(chunk)
    except BaseException:
        spool.close()
        raise
    got = digest.hexdigest()
    if got != sha256 or (size is not None and n != size):
        spool.close()
        raise ShardIntegrityError(f"shard {redact_uri(url)} is corrupt: sha256 {got[:16]}... / {n} bytes, "
                                  f"the manifest says {sha256[:16]}... / {size} bytes")
    spool.seek(0)
    return spool  # type: ignore[return-value]


class _OpenShards:
    """Pipeline stage: {url} -> {url, stream}, verified against the manifest (picklable).

    It holds the store so that a DataLoader worker started by spawn, which unpickles it, gets the
    store's endpoint and credentials registered for the s3:// gopen handler.
    """

    def __init__(self, expected: dict[str, tuple[str, int]], verify: bool, store: ObjectStore):
        self.expected, self.verify, self.store = expected, verify, store

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            url = item["url"]
            sha, size = self.expected.get(url, (None, None)) if self.verify else (None, None)
            if self.verify and sha is None:
                raise ShardIntegrityError(f"shard {redact_uri(url)} is not listed in the manifest")
            stream = _verified_stream(url, sha, size)
            try:
                yield {**item, "stream": stream}
            finally:
                stream.close()


def _expand(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: opened shards -> raw samples (member name -> bytes)."""
    return group_by_keys(tar_file_expander(src))


def _refuse_unsafe(sample: Mapping[str, Any], url: str) -> None:
    for member in sample:
        if member.startswith("__"):
            continue
        if FORBIDDEN_EXTENSIONS.intersection(member.lower().split(".")):
            raise UnsafeMemberError(
                f"shard {redact_uri(url)}: sample {sample.get('__key__')!r} holds member '{member}'; pickle-based "
                f"members ({', '.join('.' + e for e in sorted(FORBIDDEN_EXTENSIONS))}) are refused, never loaded")


def _member(sample: Mapping[str, Any], name: str, url: str) -> bytes:
    if name not in sample:
        raise SchemaError(f"shard {redact_uri(url)}: sample {sample.get('__key__')!r} lacks member '{name}'")
    return sample[name]


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SchemaError(f"{where}: image is {im.format}, expected PNG")
            return np.asarray(im).copy()
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise SchemaError(f"{where}: undecodable PNG ({exc})") from None


_REQUIRED = {"branch": ("x_k", "x_next", "log_prob", "seeds", "final_latents"), "plain": ("states", "log_probs")}


def decode_sample(sample: Mapping[str, Any], *, images: bool = True) -> dict[str, Any]:
    """Raw webdataset sample -> {"__key__", "__url__", "kind", "meta", tensors..., "images"/"image"}.

    Refuses pickle members, checks the schema version and the required members and tensors,
    naming the shard, the sample and the field on error.
    """
    url = str(sample.get("__url__", "?"))
    key = sample.get("__key__")
    _refuse_unsafe(sample, url)
    where = f"shard {redact_uri(url)}: sample {key!r}"
    try:
        meta = json.loads(_member(sample, "meta.json", url))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: meta.json is not valid JSON ({exc})") from None
    version, kind = meta.get("schema_version"), meta.get("kind")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema_version {version!r}, this tempflow reads {SCHEMA_VERSION}")
    if kind not in _REQUIRED:
        raise SchemaError(f"{where}: field 'kind' is {kind!r}, expected 'branch' or 'plain'")
    try:
        tensors = safetensors.torch.load(_member(sample, "tensors.safetensors", url))
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SchemaError(f"{where}: tensors.safetensors is unreadable ({exc})") from None
    missing = [n for n in _REQUIRED[kind] if n not in tensors]
    if missing:
        raise SchemaError(f"{where}: tensors.safetensors lacks field(s) {missing}")
    out: dict[str, Any] = {"__key__": key, "__url__": url, "kind": kind, "meta": meta, **tensors}
    if kind == "branch":
        k = int(tensors["x_next"].shape[0])
        names = [f"c{j:02d}.png" for j in range(k)]
        present = [n for n in names if n in sample]
        out["images"] = None
        if images and present:
            if len(present) != k:
                raise SchemaError(f"{where}: has {len(present)} of {k} child images")
            out["images"] = np.stack([_decode_png(sample[n], f"{where} member {n}") for n in names])
    else:
        out["image"] = _decode_png(sample["image.png"], f"{where} member image.png") \
            if images and "image.png" in sample else None
    return out


def sample_to_dataclass(d: Mapping[str, Any]) -> BranchPoint | Trajectory:
    """Decoded sample -> the BranchPoint / Trajectory it was written from (tensors bit-identical)."""
    from .rollout import BranchPoint, Trajectory

    meta = d["meta"]
    try:
        if d["kind"] == "branch":
            return BranchPoint(
                prompt_index=int(meta["prompt_index"]), prompt_id=str(meta["prompt_id"]), step=int(meta["step"]),
                sigma=float(meta["sigma"]), sigma_next=float(meta["sigma_next"]), x_k=d["x_k"], x_next=d["x_next"],
                log_prob=d["log_prob"], seeds=d["seeds"], final_latents=d["final_latents"], images=d.get("images"))
        return Trajectory(prompt_index=int(meta["prompt_index"]), prompt_id=str(meta["prompt_id"]),
                          member=int(meta["member"]), seed=int(meta["seed"]), states=d["states"],
                          log_probs=d["log_probs"], image=d.get("image"))
    except KeyError as exc:
        raise SchemaError(f"shard {redact_uri(str(d.get('__url__')))}: sample {d.get('__key__')!r}: meta.json "
                          f"lacks field {exc.args[0]!r}") from None


class _Decode:
    """Pipeline stage: raw samples -> decoded dicts (or dataclasses); picklable for workers."""

    def __init__(self, images: bool, as_dataclass: bool):
        self.images, self.as_dataclass = images, as_dataclass

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[Any]:
        for sample in src:
            d = decode_sample(sample, images=self.images)
            yield sample_to_dataclass(d) if self.as_dataclass else d


_DEFAULT = object()


def _no_shards() -> Iterator[dict[str, Any]]:
    """Source of a stage output with zero shards (SimpleShardList refuses an empty list)."""
    return iter(())


def iter_samples(
    store: StoreLike,
    prefix: str,
    *,
    manifest: Manifest | None = None,
    nodesplitter: Callable[[Iterable[Any]], Iterable[Any]] | None | Any = _DEFAULT,
    workersplitter: Callable[[Iterable[Any]], Iterable[Any]] | None | Any = _DEFAULT,
    images: bool = True,
    verify: bool = True,
    as_dataclass: bool = False,
    shard_seed: int | None = None,
) -> wds.DataPipeline:
    """A webdataset pipeline (an IterableDataset) over a complete stage output.

    Shards are split across learner processes by `nodesplitter` (default `wds.split_by_node`:
    torch.distributed rank, or the RANK/WORLD_SIZE env) and across DataLoader workers by
    `workersplitter` (default `wds.split_by_worker`); pass None to read everything here. Each
    shard is checked against the manifest's sha256 before its samples are yielded.
    `shard_seed` shuffles the shard order (the same on every rank, so the split stays exact).
    """
    store = open_store(store)
    manifest = manifest or require_manifest(store, prefix, kind="rollouts")
    urls = shard_urls(store, prefix, manifest)
    expected = {u: (s.sha256, s.bytes) for u, s in zip(urls, manifest.shards)}
    stages: list[Any] = [wds.SimpleShardList(urls, seed=shard_seed) if urls else _no_shards]
    stages.append(wds.split_by_node if nodesplitter is _DEFAULT else nodesplitter)
    stages.append(wds.split_by_worker if workersplitter is _DEFAULT else workersplitter)
    stages += [_OpenShards(expected, verify, store), _expand, _Decode(images, as_dataclass)]
    return wds.DataPipeline(*[s for s in stages if s is not None])


def _get_verified(store: ObjectStore, prefix: str, info: ObjectInfo, verify: bool) -> bytes:
    key = join_key(prefix, info.name)
    data = store.get_bytes(key)
    if verify and (hashlib.sha256(data).hexdigest() != info.sha256 or len(data) != info.bytes):
        raise ShardIntegrityError(f"object {store.uri_for(key)} is corrupt: its sha256/size differ from the manifest")
    return data


def _manifest_object(m: Manifest, name: str, store: ObjectStore, prefix: str) -> ObjectInfo:
    if name not in m.objects:
        raise SchemaError(f"manifest {store.uri_for(manifest_key(prefix))} lacks field 'objects.{name}'")
    return m.objects[name]


def read_embeds(store: StoreLike, prefix: str, manifest: Manifest | None = None,
                verify: bool = True) -> tuple[PromptEmbeds, torch.Tensor]:
    """(PromptEmbeds, sigmas) of a rollout stage output."""
    from .policy import PromptEmbeds

    store = open_store(store)
    m = manifest or require_manifest(store, prefix, kind="rollouts")
    t = safetensors.torch.load(_get_verified(store, prefix, _manifest_object(m, "embeds", store, prefix), verify))
    missing = [n for n in ("embeds", "pooled", "neg_embeds", "neg_pooled", "sigmas") if n not in t]
    if missing:
        raise SchemaError(f"{store.uri_for(join_key(prefix, EMBEDS_NAME))} lacks field(s) {missing}")
    return PromptEmbeds(t["embeds"], t["pooled"], t["neg_embeds"], t["neg_pooled"]), t["sigmas"]


def read_rollouts(store: StoreLike, prefix: str, *, images: bool = True, verify: bool = True) -> RolloutBatch:
    """Rebuild the RolloutBatch a stage wrote (embeds included; images optional), exactly.

    Reads every shard in this process (no node/worker split): for the learner's sharded
    streaming use `iter_samples`.
    """
    from .rollout import RolloutBatch

    store = open_store(store)
    m = require_manifest(store, prefix, kind="rollouts")
    emb, sigmas = read_embeds(store, prefix, m, verify)
    prompts = json.loads(_get_verified(store, prefix, _manifest_object(m, "prompts", store, prefix), verify))
    items = list(iter_samples(store, prefix, manifest=m, nodesplitter=None, workersplitter=None, images=images,
                              verify=verify, as_dataclass=True))
    if len(items) != m.num_samples:
        raise ShardError(f"{store.uri_for(join_key(prefix))}: read {len(items)} samples, the manifest lists "
                         f"{m.num_samples}")
    kind = m.rollout_kind or prompts["kind"]
    return RolloutBatch(
        kind=kind, prompts=list(prompts["prompts"]), prompt_ids=list(prompts["prompt_ids"]), embeds=emb,
        sigmas=sigmas, branch_points=items if kind == "branch" else [],
        trajectories=items if kind == "plain" else [], forward_calls=int(prompts.get("forward_calls", 0)),
        nfe=int(prompts.get("nfe", 0)),
    )


# ---------------------------------------------------------------------------- scores
@dataclass
class Scores:
    """Per-sample values (rewards, advantages, reward details) keyed by sample key."""

    name: str
    keys: list[str]
    values: dict[str, np.ndarray]  # field -> [N, ...] aligned with keys
    meta: dict[str, Any]
    manifest: Manifest

    def mapping(self, field_name: str) -> dict[str, Any]:
        """{sample key: value} of one field."""
        arr = self._field(field_name)
        return {k: arr[i] for i, k in enumerate(self.keys)}

    def aligned(self, keys: Sequence[str], field_name: str) -> np.ndarray:
        """The field's values in the order of `keys` (e.g. RolloutBatch.sample_keys())."""
        arr = self._field(field_name)
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"scores {self.name!r} have no value for {len(missing)} keys, e.g. {missing[:3]}")
        return arr[[index[k] for k in keys]]

    def _field(self, field_name: str) -> np.ndarray:
        if field_name not in self.values:
            raise KeyError(f"scores {self.name!r} have no field {field_name!r}; fields: {sorted(self.values)}")
        return self.values[field_name]


def _scores_prefix(prefix: str, name: str) -> str:
    if not isinstance(name, str) or not _SAMPLE_KEY.match(name):
        raise SchemaError(f"scores name {name!r} must use letters, digits, '_' and '-'")
    return join_key(prefix, name)


def _as_numpy(value: Any, field_name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise SchemaError(f"scores field {field_name!r}: bfloat16 is not a numpy dtype; convert to float32")
        value = value.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(value))
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise SchemaError(f"scores field {field_name!r}: numeric arrays only, got dtype {arr.dtype}")
    return arr


def write_scores(
    store: StoreLike,
    prefix: str,
    name: str,
    keys: Sequence[str],
    values: Mapping[str, Any],
    *,
    meta: Mapping[str, Any] | None = None,
    producer: Mapping[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    config_hash: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write per-sample values under `{prefix}/{name}/` (safetensors + manifest, manifest last).

    `values` maps a field (e.g. "reward", "advantage", "pickscore.raw") to an array whose first
    dimension follows `keys`. Rollout shards are never touched.
    """
    store = open_store(store)
    sp = _scores_prefix(validate_key(prefix, what="scores prefix"), name)
    keys = [str(k) for k in keys]
    for k in keys:
        _check_key(k, f"scores {name!r} key")
    if len(set(keys)) != len(keys):
        raise SchemaError(f"scores {name!r}: keys must be unique")
    if not values:
        raise SchemaError(f"scores {name!r}: no value fields given")
    arrays: dict[str, np.ndarray] = {}
    for field_name, value in values.items():
        if not isinstance(field_name, str) or not field_name or field_name.startswith("__"):
            raise SchemaError(f"scores {name!r}: invalid field name {field_name!r}")
        arr = _as_numpy(value, field_name)
        if arr.ndim == 0 or arr.shape[0] != len(keys):
            raise SchemaError(f"scores {name!r} field {field_name!r} has shape {arr.shape}; its first dimension "
                              f"must be the {len(keys)} keys")
        arrays[field_name] = arr
    prod, ckpt, cfg = _provenance(producer, checkpoint_uri, config_hash)
    _prepare_prefix(store, sp, overwrite)
    data = safetensors.numpy.save(arrays, metadata={"schema_version": str(SCHEMA_VERSION),
                                                    "keys": json.dumps(keys)})
    info = _put_object(store, sp, SCORES_NAME, data)
    manifest = Manifest(
        kind="scores", num_keys=len(keys), objects={"scores": info}, checkpoint_uri=ckpt, config_hash=cfg,
        producer=prod, created_at=_now(),
        extra={"name": name, "meta": _scrub(dict(meta or {}), "meta"),
               "fields": {f: {"dtype": str(a.dtype), "shape": list(a.shape)} for f, a in arrays.items()}},
    )
    write_manifest(store, sp, manifest)
    return manifest


def read_scores(store: StoreLike, prefix: str, name: str, *, verify: bool = True) -> Scores:
    """Scores written by write_scores; StageNotFound when their manifest is missing."""
    store = open_store(store)
    sp = _scores_prefix(validate_key(prefix, what="scores prefix"), name)
    m = require_manifest(store, sp, kind="scores")
    data = _get_verified(store, sp, _manifest_object(m, "scores", store, sp), verify)
    arrays = safetensors.numpy.load(data)
    header = _safetensors_metadata(data, store.uri_for(join_key(sp, SCORES_NAME)))
    keys = json.loads(header.get("keys", "[]"))
    for field_name, arr in arrays.items():
        if arr.shape[0] != len(keys):
            raise SchemaError(f"{store.uri_for(join_key(sp, SCORES_NAME))}: field {field_name!r} does not match "
                              f"its {len(keys)} keys")
    return Scores(name=name, keys=keys, values=arrays, meta=dict(m.extra.get("meta", {})), manifest=m)


def _safetensors_metadata(data: bytes, uri: str) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
    except (ValueError, AttributeError) as exc:
        raise SchemaError(f"{uri}: unreadable safetensors header ({exc})") from None


def scores_complete(store: StoreLike, prefix: str, name: str) -> bool:
    """Whether scores `name` exist under `prefix` (manifest present)."""
    return stage_complete(store, _scores_prefix(validate_key(prefix, what="scores prefix"), name))
