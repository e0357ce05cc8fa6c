"""Reading a rollout stage: a webdataset pipeline over its shards, and the whole batch back.

Every shard is checked against its manifest entry (sha256, size) before any of its samples is
used. The pipeline carries the store and opens shards through it, so a DataLoader worker
(forked or spawned) reads from the same endpoint with the same credentials.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

import safetensors.torch
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from tempflow_core.redaction import redact_uri
from tempflow_core.storage import ObjectStore, S3Store, StoreLike, iter_chunks, join_key, open_store
from tempflow_core.shards.errors import SchemaError, ShardError, ShardIntegrityError
from tempflow_core.shards.gopen import register_s3_gopen
from tempflow_core.shards.manifest import Manifest, get_listed_object, require_manifest
from tempflow_core.shards.samples import decode_sample, sample_to_dataclass
from tempflow_core.shards.schema import EMBEDS_NAME
from tempflow_core.batches import PromptEmbeds, RolloutBatch


_SPOOL_BYTES = 64 << 20  # shards up to this size are verified in memory, larger ones spill to disk
_DEFAULT = object()  # "use webdataset's splitter" (None means: no split)


def shard_urls(store: StoreLike, prefix: str, manifest: Manifest | None = None) -> list[str]:
    """URLs of the shards of a complete stage output, in manifest order.

    A stock `wds.WebDataset` reads them: for an S3 store, the s3:// gopen handler is registered
    with this store's settings (see `gopen.py`).
    """
    store = open_store(store)
    manifest = manifest or require_manifest(store, prefix)
    if isinstance(store, S3Store):
        register_s3_gopen(store)
    return _urls(store, prefix, manifest)


def _urls(store: ObjectStore, prefix: str, manifest: Manifest) -> list[str]:
    return [store.uri_for(join_key(prefix, s.name)) for s in manifest.shards]


class _ListedShard(NamedTuple):
    key: str  # store key of the shard
    sha256: str
    bytes: int


def _verified_stream(src: BinaryIO, url: str, sha256: str, size: int) -> BinaryIO:
    """The bytes of `src`, checked against the manifest entry before any sample is used; spooled
    (memory, then disk). Closes `src`."""
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
    if got != sha256 or n != size:
        spool.close()
        raise ShardIntegrityError(f"shard {redact_uri(url)} is corrupt: sha256 {got[:16]}... / {n} bytes, "
                                  f"the manifest says {sha256[:16]}... / {size} bytes")
    spool.seek(0)
    return spool  # type: ignore[return-value]


class _OpenShards:
    """Pipeline stage: {url} -> {url, stream}, verified against the manifest (picklable).

    It holds the store and opens each shard through it, so that a DataLoader worker started by
    spawn, which unpickles it, reads with the store's endpoint and credentials.
    """

    def __init__(self, listed: dict[str, _ListedShard], verify: bool, store: ObjectStore):
        self.listed, self.verify, self.store = listed, verify, store

    def _open(self, url: str) -> BinaryIO:
        entry = self.listed.get(url)
        if entry is None:
            if self.verify:
                raise ShardIntegrityError(f"shard {redact_uri(url)} is not listed in the manifest")
            return self.store.open_read(self.store.key_for(url))
        src = self.store.open_read(entry.key)
        return _verified_stream(src, url, entry.sha256, entry.bytes) if self.verify else src

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            stream = self._open(item["url"])
            try:
                yield {**item, "stream": stream}
            finally:
                stream.close()


def _expand(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: opened shards -> raw samples (member name -> bytes)."""
    return group_by_keys(tar_file_expander(src))


class _Decode:
    """Pipeline stage: raw samples -> decoded dicts (or dataclasses); picklable for workers."""

    def __init__(self, images: bool, as_dataclass: bool):
        self.images, self.as_dataclass = images, as_dataclass

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[Any]:
        for sample in src:
            d = decode_sample(sample, images=self.images)
            yield sample_to_dataclass(d) if self.as_dataclass else d


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
    urls = _urls(store, prefix, manifest)
    listed = {u: _ListedShard(join_key(prefix, s.name), s.sha256, s.bytes) for u, s in zip(urls, manifest.shards)}
    stages: list[Any] = [wds.SimpleShardList(urls, seed=shard_seed) if urls else _no_shards]
    stages.append(wds.split_by_node if nodesplitter is _DEFAULT else nodesplitter)
    stages.append(wds.split_by_worker if workersplitter is _DEFAULT else workersplitter)
    stages += [_OpenShards(listed, verify, store), _expand, _Decode(images, as_dataclass)]
    return wds.DataPipeline(*[s for s in stages if s is not None])


def read_embeds(store: StoreLike, prefix: str, manifest: Manifest | None = None,
                verify: bool = True) -> tuple[PromptEmbeds, torch.Tensor]:
    """(PromptEmbeds, sigmas) of a rollout stage output."""

    store = open_store(store)
    m = manifest or require_manifest(store, prefix, kind="rollouts")
    t = safetensors.torch.load(get_listed_object(store, prefix, m, "embeds", verify))
    missing = [n for n in ("embeds", "pooled", "neg_embeds", "neg_pooled", "sigmas") if n not in t]
    if missing:
        raise SchemaError(f"{store.uri_for(join_key(prefix, EMBEDS_NAME))} lacks field(s) {missing}")
    if ("mask" in t) != ("neg_mask" in t):
        raise SchemaError(f"{store.uri_for(join_key(prefix, EMBEDS_NAME))} holds one of mask / neg_mask without the other")
    return PromptEmbeds.from_tensors(t), t["sigmas"]


def read_rollouts(store: StoreLike, prefix: str, *, images: bool = True, verify: bool = True) -> RolloutBatch:
    """Rebuild the RolloutBatch a stage wrote (embeds included; images optional), exactly.

    Reads every shard in this process (no node/worker split): for the learner's sharded
    streaming use `iter_samples`.
    """

    store = open_store(store)
    m = require_manifest(store, prefix, kind="rollouts")
    emb, sigmas = read_embeds(store, prefix, m, verify)
    prompts = json.loads(get_listed_object(store, prefix, m, "prompts", verify))
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
