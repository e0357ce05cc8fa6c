"""Writing a rollout stage: samples into tar shards on the store, side objects, manifest last.

Shards are written to a local temp folder and each finished one is uploaded by a small thread
pool while the next is being encoded. If anything fails, no manifest is written and the stage
stays absent (its shards, if any, are not a stage).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from tempflow_core.storage import ObjectStore, StoreLike, join_key, open_store, validate_key
from tempflow_core.shards.errors import SchemaError
from tempflow_core.shards.manifest import (
    Manifest, ShardInfo, now, prepare_prefix, provenance, put_listed_object, scrub_metadata, write_manifest,
)
from tempflow_core.shards.png import auto_png_level
from tempflow_core.shards.samples import encode_branch_point, encode_embeds, encode_trajectory
from tempflow_core.shards.schema import EMBEDS_NAME, PROMPTS_NAME, SCHEMA_VERSION, json_bytes
from tempflow_core.shards.tar import ShardFile
from tempflow_core.batches import PromptEmbeds, RolloutBatch


log = logging.getLogger("tempflow.shards")

SHARD_TMP = "tempflow-shards-"  # local folders of shards being written: tempflow-shards-{pid}-{random}


def shard_tmp_prefix() -> str:
    """The name prefix of this process's shard temp folders: the pid tells a later run whether
    the writer is gone (runlock.clean_after_kill removes the folders of dead writers)."""
    return f"{SHARD_TMP}{os.getpid()}-"


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
    (see `tar.py`). Uploads run in a small thread pool while the next shard is being encoded;
    all are awaited (or the error raised) before this returns. Writes no manifest.
    """
    store = open_store(store)
    with tempfile.TemporaryDirectory(prefix=shard_tmp_prefix(), dir=tmp_dir) as folder, \
            cf.ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        return _write_shards(samples, store, prefix, folder, pool, samples_per_shard, max_shard_bytes)


def _upload(store: ObjectStore, key: str, path: str) -> None:
    try:
        store.put_file(key, path)
    finally:
        os.unlink(path)


def _write_shards(samples: Iterable[dict[str, Any]], store: ObjectStore, prefix: str, folder: str,
                  pool: cf.Executor, samples_per_shard: int, max_shard_bytes: int | None,
                  name_prefix: str = "") -> list[ShardInfo]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    validate_key(prefix, what="stage prefix")
    infos: list[ShardInfo] = []
    futures: list[cf.Future[None]] = []
    shard: ShardFile | None = None
    try:
        for sample in samples:
            if shard is None:
                shard = ShardFile(len(infos), folder, name_prefix)
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


def _first_images(items: Sequence[Any]) -> Iterator[np.ndarray]:
    for item in items[:1]:
        many = hasattr(item, "child_keys")  # a BranchPoint: K images
        images = getattr(item, "images", None) if many else getattr(item, "image", None)
        if images is not None and len(images):
            yield images[0] if many else images


def _check_unique_keys(batch: RolloutBatch) -> list[Any]:
    """The batch's samples (branch points or trajectories), refused if their keys repeat."""
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


def _encoded(batch: RolloutBatch, images: bool, png_level: int | None) -> Iterator[dict[str, Any]]:
    """The batch's webdataset samples, refused up front if their keys repeat."""
    items = _check_unique_keys(batch)
    encode: Callable[..., dict[str, Any]] = encode_branch_point if batch.kind == "branch" else encode_trajectory
    if png_level is None:
        first = next((im for im in _first_images(items)), None)
        png_level = auto_png_level(first) if first is not None else 1
    return (encode(item, images=images, png_level=png_level) for item in items)


@dataclass
class RolloutPart:
    """One slice of a rollout stage, its shards already on the store: what the stage's
    manifest needs from it. Parts are merged in slice order (`publish_rollouts`)."""

    index: int
    kind: str  # "branch" | "plain"
    prompts: list[str]
    prompt_ids: list[str]
    embeds: PromptEmbeds  # rows of this slice's prompts
    sigmas: Any  # [T+1] float64 tensor
    shards: list[ShardInfo]
    num_samples: int
    num_keys: int
    forward_calls: int
    nfe: int


def part_name_prefix(index: int) -> str:
    return f"part-{index:03d}-"


def write_rollout_part(batch: RolloutBatch, store: StoreLike, prefix: str, index: int, *,
                       samples_per_shard: int = 32, max_shard_bytes: int | None = None, images: bool = True,
                       png_level: int | None = None, tmp_dir: str | None = None,
                       upload_workers: int = 2) -> RolloutPart:
    """Write slice `index` of a rollout stage as shards `part-{index:03d}-shard-*.tar` under
    `prefix` (no manifest: the stage publishes one over all parts). Its samples must already
    carry the stage's global prompt indices and ids."""
    store = open_store(store)
    prefix = validate_key(prefix, what="stage prefix")
    samples = _encoded(batch, images, png_level)
    with tempfile.TemporaryDirectory(prefix=shard_tmp_prefix(), dir=tmp_dir) as folder, \
            cf.ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        shards = _write_shards(samples, store, prefix, folder, pool, samples_per_shard, max_shard_bytes,
                               part_name_prefix(index))
    n = len(batch.branch_points) if batch.kind == "branch" else len(batch.trajectories)
    return RolloutPart(index, batch.kind, list(batch.prompts), list(batch.prompt_ids), batch.embeds,
                       batch.sigmas, shards, n, len(batch.sample_keys()), int(batch.forward_calls), int(batch.nfe))


def publish_rollouts(parts: Sequence[RolloutPart], store: StoreLike, prefix: str, *,
                     producer: Mapping[str, Any] | None = None, checkpoint_uri: str | None = None,
                     config_hash: str | None = None, extra: Mapping[str, Any] | None = None) -> Manifest:
    """Merge parts written by `write_rollout_part` into one stage output: the joined prompts
    and embeddings, then the manifest (last) listing every part's shards in slice order."""


    store = open_store(store)
    prefix = validate_key(prefix, what="stage prefix")
    parts = sorted(parts, key=lambda p: p.index)
    if not parts or [p.index for p in parts] != list(range(len(parts))):
        raise SchemaError(f"rollout parts {[p.index for p in parts]} of {store.uri_for(prefix)} are not 0..n-1")
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise SchemaError(f"rollout parts of {store.uri_for(prefix)} mix kinds {sorted(kinds)}")
    emb = PromptEmbeds.cat([p.embeds for p in parts])
    ids = [i for p in parts for i in p.prompt_ids]
    if len(set(ids)) != len(ids):
        raise SchemaError(f"rollout parts of {store.uri_for(prefix)} repeat prompt ids")
    side = _side_objects(parts[0].kind, [t for p in parts for t in p.prompts], ids, emb, parts[0].sigmas,
                         sum(p.forward_calls for p in parts), sum(p.nfe for p in parts))
    objects = {k: put_listed_object(store, prefix, name, data) for k, (name, data) in side.items()}
    return _publish(store, prefix, parts[0].kind, sum(p.num_samples for p in parts), sum(p.num_keys for p in parts),
                    [s for p in parts for s in p.shards], objects, producer, checkpoint_uri, config_hash, extra)


def _side_objects(kind: str, prompts: Sequence[str], prompt_ids: Sequence[str], embeds: PromptEmbeds, sigmas: Any,
                  forward_calls: int, nfe: int) -> dict[str, tuple[str, bytes]]:
    """A rollout stage's objects besides its shards: embeddings + sigmas, and the prompts header."""
    header = {"schema_version": SCHEMA_VERSION, "kind": kind, "prompts": list(prompts), "prompt_ids": list(prompt_ids),
              "forward_calls": int(forward_calls), "nfe": int(nfe)}
    return {"embeds": (EMBEDS_NAME, encode_embeds(embeds, sigmas)),
            "prompts": (PROMPTS_NAME, json_bytes(header, "RolloutBatch.prompts"))}


def _publish(store: ObjectStore, prefix: str, kind: str, num_samples: int, num_keys: int, shards: list[ShardInfo],
             objects: dict[str, Any], producer: Mapping[str, Any] | None, checkpoint_uri: str | None,
             config_hash: str | None, extra: Mapping[str, Any] | None) -> Manifest:
    prod, ckpt, cfg = provenance(producer, checkpoint_uri, config_hash)
    manifest = Manifest(
        kind="rollouts", rollout_kind=kind, num_samples=num_samples, num_keys=num_keys,
        shards=shards, objects=objects, checkpoint_uri=ckpt, config_hash=cfg, producer=prod,
        extra=scrub_metadata(dict(extra or {}), "extra"), created_at=now(),
    )
    uri = write_manifest(store, prefix, manifest)
    log.info("wrote %d samples (%d keys) in %d shards, %d bytes, to %s", manifest.num_samples, manifest.num_keys,
             len(shards), sum(s.bytes for s in shards), uri)
    return manifest


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
    samples = _encoded(batch, images, png_level)
    prepare_prefix(store, prefix, overwrite)
    side = _side_objects(batch.kind, batch.prompts, batch.prompt_ids, batch.embeds, batch.sigmas, batch.forward_calls,
                         batch.nfe)
    with tempfile.TemporaryDirectory(prefix=shard_tmp_prefix(), dir=tmp_dir) as folder, \
            cf.ThreadPoolExecutor(max(1, upload_workers), thread_name_prefix="shard-upload") as pool:
        pending = {k: pool.submit(put_listed_object, store, prefix, name, data) for k, (name, data) in side.items()}
        shards = _write_shards(samples, store, prefix, folder, pool, samples_per_shard, max_shard_bytes)
        objects = {k: fut.result() for k, fut in pending.items()}
    n = len(batch.branch_points) if batch.kind == "branch" else len(batch.trajectories)
    return _publish(store, prefix, batch.kind, n, len(batch.sample_keys()), shards, objects, producer, checkpoint_uri,
                    config_hash, extra)
