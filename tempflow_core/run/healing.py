"""Healing damaged stage outputs: check, move aside, recompute, and prove the recompute.

A finished stage output (manifest present) is used only when

  * every object its manifest lists is there with the recorded sha256 and size, and
  * the inputs it was computed from are still the ones on the store: each stage records,
    in its manifest's `producer.inputs`, the content digest of every upstream output it
    read (rollout <- checkpoint i-1; reward <- rollout i; learner <- checkpoint i-1,
    rollout i, reward i; eval <- checkpoint i), and reward and eval the shapes detector's
    rules they read images with (`ASSUMED`: what an output recorded before an input was
    added was made with).

Anything else is moved aside, whole, under `{run}/quarantine/{iter-i|init}/{stage}/{nn}/`
(with `heal.json` saying why) and the stage is recomputed. Rollouts, rewards and updates
are deterministic functions of the config and seeds, so a recomputed output whose inputs
did not change must reproduce the sha256 of every object its quarantined manifest lists;
a mismatch means nondeterminism and is logged as an error and recorded in heal.json.

The content digest of an output hashes the names and sha256 of its objects, not the
manifest file (which holds the creation time): an output recomputed to the same bytes does
not invalidate what was computed from it, and one that differs invalidates all of it.
Objects that hold wall-clock times (a checkpoint's state.json with its stage timings) are
left out of the digest and of the reproduction check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from tempflow_core.run.layout import RunLayout
from tempflow_core.shards import MANIFEST_NAME, Manifest, SchemaError, read_manifest
from tempflow_core.storage import ObjectNotFound, ObjectStore, iter_chunks, join_key

log = logging.getLogger("tempflow.heal")

HEAL_FILE = "heal.json"
VOLATILE = {"checkpoint": frozenset({"state.json"})}  # objects holding wall times, by manifest kind


class NondeterminismWarning(RuntimeWarning):
    """A recomputed stage output differs from the one it replaced although its inputs did not."""


@dataclass(frozen=True)
class Quarantined:
    """A damaged output that was moved aside."""

    prefix: str  # where it lies now
    reason: str
    manifest: Manifest | None  # its manifest, when that was readable


def _entries(m: Manifest) -> dict[str, str]:
    """{object name: sha256} of what the manifest lists, volatile objects left out."""
    skip = VOLATILE.get(m.kind, frozenset())
    out = {s.name: s.sha256 for s in m.shards}
    out.update({o.name: o.sha256 for o in m.objects.values() if o.name not in skip})
    return out


def content_digest(m: Manifest) -> str:
    """sha256 over the (name, sha256) of the objects a manifest lists (see module docstring)."""
    return hashlib.sha256(json.dumps(sorted(_entries(m).items())).encode()).hexdigest()


def stage_digest(layout: RunLayout, iteration: int, stage: str) -> str | None:
    """The content digest of a finished stage output (None: absent or unreadable)."""
    try:
        m = read_manifest(layout.store, layout.prefix(iteration, stage))
    except SchemaError:
        return None
    return content_digest(m) if m is not None else None


def _object_key(prefix: str, m: Manifest, name: str) -> str:
    # checkpoints list "adapter/pytorch_lora_weights.safetensors" as "adapter__pytorch_...";
    # their manifest key is the name with '/' replaced
    return join_key(prefix, name.replace("__", "/") if m.kind == "checkpoint" else name)


def _sha256(store: ObjectStore, key: str) -> tuple[str, int]:
    digest, n = hashlib.sha256(), 0
    with store.open_read(key) as f:
        for chunk in iter_chunks(f, 4 << 20):
            digest.update(chunk)
            n += len(chunk)
    return digest.hexdigest(), n


def damage(layout: RunLayout, m: Manifest, prefix: str) -> str | None:
    """Why the objects of a finished output are unusable (the first one found), or None."""
    listed = [(s.name, s.sha256, s.bytes) for s in m.shards] + [(o.name, o.sha256, o.bytes) for o in m.objects.values()]
    for name, sha, size in listed:
        key = _object_key(prefix, m, name)
        try:
            got, n = _sha256(layout.store, key)
        except ObjectNotFound:
            return f"{layout.store.uri_for(key)} is missing"
        if got != sha or n != size:
            return (f"{layout.store.uri_for(key)} is corrupt: sha256 {got[:12]}... / {n} bytes, the manifest says "
                    f"{sha[:12]}... / {size} bytes")
    return None


ASSUMED: Mapping[str, str] = MappingProxyType({"detector": "v1"})
"""Inputs added after outputs were first recorded, and the value an output that does not record
them was made with: reward and eval outputs written before the detector's audit read images
with its rules v1."""


def stale_inputs(m: Manifest, inputs: Mapping[str, str | None]) -> str | None:
    """Which recorded input differs from the current one (None: all agree, or none recorded:
    outputs written before inputs were recorded are trusted; an input the manifest does not
    record counts as its `ASSUMED` value, else as agreeing)."""
    recorded = (m.producer or {}).get("inputs")
    if not isinstance(recorded, dict):
        return None
    for name, digest in inputs.items():
        was = recorded.get(name, ASSUMED.get(name, digest))
        if was != digest:
            return f"its input {name!r} changed since it was computed (recomputed or replaced upstream)"
    return None


def check(layout: RunLayout, iteration: int, stage: str, inputs: Mapping[str, str | None]) -> bool | Quarantined:
    """True: the finished output is usable. False: there is none. A Quarantined: there was
    one, damaged or stale, and it has been moved aside (the caller recomputes it)."""
    prefix = layout.prefix(iteration, stage)
    try:
        m = read_manifest(layout.store, prefix)
    except SchemaError as exc:
        return quarantine(layout, iteration, stage, f"unreadable manifest: {exc}", None)
    if m is None:
        return False
    reason = damage(layout, m, prefix) or stale_inputs(m, inputs)
    if reason is None:
        return True
    return quarantine(layout, iteration, stage, reason, m)


def quarantine(layout: RunLayout, iteration: int, stage: str, reason: str, m: Manifest | None) -> Quarantined:
    """Move the output at (iteration, stage) under the quarantine prefix, manifest first out."""
    store, prefix = layout.store, layout.prefix(iteration, stage)
    base = layout.quarantine_prefix(iteration, stage)
    taken = {k[len(base) + 1:].split("/", 1)[0] for k in store.list(base)}
    dest = join_key(base, f"{len(taken) + 1:02d}")
    keys = store.list(prefix)
    manifest = join_key(prefix, MANIFEST_NAME)
    for key in [k for k in keys if k != manifest] + [k for k in keys if k == manifest]:
        store.put_bytes(join_key(dest, key[len(prefix) + 1:]), store.get_bytes(key))
    _write_record(store, dest, {"reason": reason, "stage": stage, "iteration": iteration,
                                "moved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "inputs": (m.producer or {}).get("inputs") if m else None})
    store.delete(manifest)  # from here on the stage is absent for every reader
    store.delete_prefix(prefix)
    log.warning("%s: %s; moved to %s and recomputing", store.uri_for(prefix), reason, store.uri_for(dest))
    return Quarantined(dest, reason, m)


def _write_record(store: ObjectStore, dest: str, record: dict[str, Any]) -> None:
    store.put_bytes(join_key(dest, HEAL_FILE), json.dumps(record, indent=1, sort_keys=True).encode())


def compare(layout: RunLayout, iteration: int, stage: str, moved: Quarantined) -> bool | None:
    """After recomputing a quarantined output: did it reproduce the old objects' sha256?

    None when there is nothing to compare (the old manifest was unreadable, or the output was
    stale: its inputs differ, so different bytes are expected). A mismatch is nondeterminism:
    logged as an error, warned, and recorded in the quarantine's heal.json."""
    store = layout.store
    new = read_manifest(store, layout.prefix(iteration, stage))
    old = moved.manifest
    record = json.loads(store.get_bytes(join_key(moved.prefix, HEAL_FILE)))
    same_inputs = old is not None and new is not None and \
        (old.producer or {}).get("inputs") == (new.producer or {}).get("inputs")
    if not same_inputs or old is None or new is None:
        record["reproduced"] = None
        _write_record(store, moved.prefix, record)
        return None
    a, b = _entries(old), _entries(new)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    record["reproduced"] = not differ
    record["differs"] = differ
    _write_record(store, moved.prefix, record)
    if differ:
        msg = (f"NONDETERMINISM: recomputing {store.uri_for(layout.prefix(iteration, stage))} from the same inputs "
               f"gave different bytes for {', '.join(differ[:5])} (the damaged output is kept at "
               f"{store.uri_for(moved.prefix)}); the run continues on the recomputed output")
        log.error(msg)
        warnings.warn(msg, NondeterminismWarning, stacklevel=2)
    else:
        log.info("%s recomputed: all %d objects reproduce the quarantined sha256", store.uri_for(
            layout.prefix(iteration, stage)), len(a))
    return not differ
