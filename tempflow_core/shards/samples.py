"""One webdataset sample of the rollout schema, both ways: BranchPoint / Trajectory <-> members.

A sample is a dict of member name -> bytes plus `__key__` (see `schema.py` for its members).
Tensors go through safetensors (bf16 round-trips bit-identically); nothing is pickled, and a
sample holding a pickle-based member (.pth/.pt/.pickle/.pkl/.pyd) is refused when read.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from tempflow_core.redaction import redact_uri
from tempflow_core.shards.errors import SchemaError, UnsafeMemberError
from tempflow_core.shards.png import decode_png, encode_png
from tempflow_core.shards.schema import (FORBIDDEN_EXTENSIONS, READABLE_VERSIONS, SCHEMA_VERSION, check_sample_key,
                                         is_forbidden_member, json_bytes)
from tempflow_core.batches import BranchPoint, PromptEmbeds, Trajectory


_NUMPY_SAFE = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.uint8, torch.bool}
# Tensors each kind of sample must hold.
# (final_latents, the children's last states, were written until the images alone were kept: read
# when present, never required.)
_REQUIRED = {"branch": ("x_k", "x_next", "log_prob", "seeds"), "plain": ("states", "log_probs")}


def tensor_bytes(tensors: Mapping[str, Any], where: str) -> bytes:
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


# ---------------------------------------------------------------------------- encoding
def encode_branch_point(bp: BranchPoint, *, images: bool = True, png_level: int = 1) -> dict[str, Any]:
    """One webdataset sample (member name -> bytes) for a branch point."""
    key = check_sample_key(bp.group_id, "BranchPoint.group_id")
    where = f"branch point {key}"
    k = int(bp.x_next.shape[0])
    for name in ("log_prob", "seeds"):
        t = getattr(bp, name)
        if not isinstance(t, torch.Tensor) or t.shape[0] != k:
            raise SchemaError(f"{where}: field {name!r} must have {k} rows (one per child)")
    meta = {
        "schema_version": SCHEMA_VERSION, "kind": "branch", "key": key, "group_id": key,
        "prompt_id": bp.prompt_id, "prompt_index": int(bp.prompt_index), "step": int(bp.step),
        "sigma": float(bp.t), "sigma_next": float(bp.t_next), "child_keys": bp.child_keys,
        "seeds": [int(s) for s in bp.seeds.tolist()],
    }
    sample: dict[str, Any] = {
        "__key__": key,
        "meta.json": json_bytes(meta, where),
        # what the learner reads, in the dtype the rollout kept it (the model's half precision, else
        # float32); the children's final latents are not kept: their images are
        "tensors.safetensors": tensor_bytes({"x_k": bp.x_k, "x_next": bp.x_next, "log_prob": bp.log_prob,
                                             "seeds": bp.seeds}, where),
    }
    if images and bp.images is not None:
        if len(bp.images) != k:
            raise SchemaError(f"{where}: field 'images' has {len(bp.images)} rows, expected {k}")
        for j in range(k):
            sample[f"c{j:02d}.png"] = encode_png(bp.images[j], f"{where} child {j}", png_level)
    return sample


def encode_trajectory(tr: Trajectory, *, images: bool = True, png_level: int = 1) -> dict[str, Any]:
    """One webdataset sample for a plain SDE trajectory."""
    key = check_sample_key(tr.key, "Trajectory.key")
    where = f"trajectory {key}"
    meta = {
        "schema_version": SCHEMA_VERSION, "kind": "plain", "key": key, "group_id": tr.group_id,
        "prompt_id": tr.prompt_id, "prompt_index": int(tr.prompt_index), "member": int(tr.member),
        "seed": int(tr.seed),
    }
    sample: dict[str, Any] = {
        "__key__": key,
        "meta.json": json_bytes(meta, where),
        "tensors.safetensors": tensor_bytes({"states": tr.states, "log_probs": tr.log_probs}, where),
    }
    if images and tr.image is not None:
        sample["image.png"] = encode_png(tr.image, where, png_level)
    return sample


def encode_embeds(e: PromptEmbeds, sigmas: torch.Tensor) -> bytes:
    """embeds.safetensors of a stage output: its PromptEmbeds and sigmas [T+1], once per stage."""
    return tensor_bytes({**e.tensors(), "sigmas": sigmas}, "RolloutBatch.embeds")


# ---------------------------------------------------------------------------- decoding
def _refuse_unsafe(sample: Mapping[str, Any], url: str) -> None:
    for member in sample:
        if member.startswith("__"):
            continue
        if is_forbidden_member(member):
            raise UnsafeMemberError(
                f"shard {redact_uri(url)}: sample {sample.get('__key__')!r} holds member '{member}'; pickle-based "
                f"members ({', '.join('.' + e for e in sorted(FORBIDDEN_EXTENSIONS))}) are refused, never loaded")


def _member(sample: Mapping[str, Any], name: str, url: str) -> bytes:
    if name not in sample:
        raise SchemaError(f"shard {redact_uri(url)}: sample {sample.get('__key__')!r} lacks member '{name}'")
    return sample[name]


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
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{where}: schema_version {version!r}, this tempflow reads {list(READABLE_VERSIONS)}")
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
            out["images"] = np.stack([decode_png(sample[n], f"{where} member {n}") for n in names])
    else:
        out["image"] = decode_png(sample["image.png"], f"{where} member image.png") \
            if images and "image.png" in sample else None
    return out


def sample_to_dataclass(d: Mapping[str, Any]) -> BranchPoint | Trajectory:
    """Decoded sample -> the BranchPoint / Trajectory it was written from (tensors bit-identical)."""

    meta = d["meta"]
    try:
        if d["kind"] == "branch":
            return BranchPoint(
                prompt_index=int(meta["prompt_index"]), prompt_id=str(meta["prompt_id"]), step=int(meta["step"]),
                t=float(meta["sigma"]), t_next=float(meta["sigma_next"]), x_k=d["x_k"], x_next=d["x_next"],
                log_prob=d["log_prob"], seeds=d["seeds"], final_latents=d.get("final_latents"), images=d.get("images"))
        return Trajectory(prompt_index=int(meta["prompt_index"]), prompt_id=str(meta["prompt_id"]),
                          member=int(meta["member"]), seed=int(meta["seed"]), states=d["states"],
                          log_probs=d["log_probs"], image=d.get("image"))
    except KeyError as exc:
        raise SchemaError(f"shard {redact_uri(str(d.get('__url__')))}: sample {d.get('__key__')!r}: meta.json "
                          f"lacks field {exc.args[0]!r}") from None
