"""Learner checkpoints on the object store: everything an exact resume needs.

A checkpoint is the adapter only (never the base model): the LoRA in diffusers' format,
the AdamW state, the minibatch-shuffle RNG state and the position in the prompt stream.
Rollout noise is derived from seeds, so these are all the RNG state a run has. Tensors are
safetensors; the rest is JSON; the manifest is written last.

    {prefix}/adapter/pytorch_lora_weights.safetensors   loads with diffusers' load_lora_weights
    {prefix}/optimizer.safetensors                      AdamW moments and step counts
    {prefix}/rng.safetensors                            torch.Generator state of the shuffler
    {prefix}/ema.safetensors                            EMA of the LoRA (when train.ema_decay > 0)
    {prefix}/state.json                                 iteration, stream position, lineage, metrics
    {prefix}/manifest.json                              kind "checkpoint", sha256 of every object
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from tempflow_core.canonical import canonical_safetensors
from tempflow_core.shards import Manifest, ObjectInfo, ShardIntegrityError, require_manifest, write_manifest
from tempflow_core.storage import ObjectStore, join_key

ADAPTER = "adapter/pytorch_lora_weights.safetensors"


@dataclass
class CheckpointState:
    iteration: int  # -1 for the initial adapter
    stream_position: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # torch optimizer state_dict, None before the first update
    generator_state: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)  # lineage and metrics
    ema: dict[str, torch.Tensor] | None = None  # EMA of the LoRA when train.ema_decay > 0


def _optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(store: ObjectStore, prefix: str, ck: CheckpointState, lora_metadata: dict[str, Any],
                    producer: dict[str, Any] | None = None) -> Manifest:
    """Write every object, then the manifest (so a killed write leaves no checkpoint).
    `producer`: provenance for the manifest (the stage and the digests of its inputs)."""
    from diffusers import StableDiffusion3Pipeline

    objects: dict[str, ObjectInfo] = {}

    def put(name: str, data: bytes) -> None:
        store.put_bytes(join_key(prefix, name), data)
        objects[name.replace("/", "__")] = ObjectInfo(name.replace("/", "__"), hashlib.sha256(data).hexdigest(), len(data))

    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=ck.lora, safe_serialization=True,
                                                   transformer_lora_adapter_metadata=lora_metadata)
        put(ADAPTER, canonical_safetensors((Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes()))
    groups: list[dict[str, Any]] = []
    if ck.optimizer is not None:
        tensors, groups = _optimizer_to_tensors(ck.optimizer)
        put("optimizer.safetensors", safetensors.torch.save(tensors) if tensors else b"")
    put("rng.safetensors", safetensors.torch.save({"shuffle": ck.generator_state.contiguous()}))
    if ck.ema is not None:
        put("ema.safetensors", safetensors.torch.save({k: v.contiguous() for k, v in ck.ema.items()}))
    state = {"iteration": ck.iteration, "stream_position": ck.stream_position, "param_groups": groups,
             "has_optimizer": ck.optimizer is not None, "has_ema": ck.ema is not None, "info": ck.info}
    put("state.json", json.dumps(state, indent=1, sort_keys=True, default=str).encode())
    m = Manifest(kind="checkpoint", objects=objects, producer=dict(producer or {}), extra={"iteration": ck.iteration})
    write_manifest(store, prefix, m)
    return m


def _get(store: ObjectStore, prefix: str, m: Manifest, name: str) -> bytes:
    info = m.objects[name.replace("/", "__")]
    key = join_key(prefix, name)
    data = store.get_bytes(key)
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardIntegrityError(f"checkpoint object {store.uri_for(key)} is corrupt: sha256 differs from the manifest")
    return data


def load_checkpoint(store: ObjectStore, prefix: str) -> CheckpointState:
    """Read a complete checkpoint (verifying sha256); raises StageNotFound naming the URI if absent."""
    m = require_manifest(store, prefix, kind="checkpoint")
    state = json.loads(_get(store, prefix, m, "state.json"))
    raw = safetensors.torch.load(_get(store, prefix, m, ADAPTER))
    lora = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in raw.items()}
    optimizer = None
    if state["has_optimizer"]:
        data = _get(store, prefix, m, "optimizer.safetensors")
        optimizer = _optimizer_from_tensors(safetensors.torch.load(data) if data else {}, state["param_groups"])
    rng = safetensors.torch.load(_get(store, prefix, m, "rng.safetensors"))["shuffle"]
    ema = safetensors.torch.load(_get(store, prefix, m, "ema.safetensors")) if state.get("has_ema") else None
    return CheckpointState(state["iteration"], state["stream_position"], lora, optimizer, rng, state.get("info", {}),
                           ema)


def read_state(store: ObjectStore, prefix: str) -> dict[str, Any]:
    """state.json of a complete checkpoint (iteration, lineage, metrics), without the tensors."""
    m = require_manifest(store, prefix, kind="checkpoint")
    return json.loads(_get(store, prefix, m, "state.json"))


def adapter_bytes(store: ObjectStore, prefix: str) -> bytes:
    """The verified adapter file of a checkpoint (for export and MLflow)."""
    return _get(store, prefix, require_manifest(store, prefix, kind="checkpoint"), ADAPTER)
