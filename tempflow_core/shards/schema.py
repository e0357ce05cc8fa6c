"""The on-store layout of a stage output (schema version 2): names, sample keys, member rules.

Version 2 (model families): the conditioning and the latents are named tensors of any shape.
embeds.safetensors may hold `mask` and `neg_mask` ([B, L] / [1, L] int64, 1 = a prompt token) for
a family whose conditioning is masked (Qwen-Image), and `pooled` may be zero-wide; latents are
[C, H, W] for images and [C, F', H, W] for clips, whose images are frame strips [H, F W, 3].
Version 1 outputs (no masks, [C, H, W] latents) are read as they were; a newer version is refused.

A rollout stage writes, under its prefix:

    shard-000000.tar ...   webdataset shards, one sample per branch point (or plain trajectory)
    embeds.safetensors     PromptEmbeds (embeds, pooled, neg_embeds, neg_pooled; mask, neg_mask where the
                           family masks its text) + sigmas, once
    prompts.json           prompt texts and ids, rollout kind and counters
    manifest.json          written LAST: schema version, sha256/size/sample count of every object,
                           producing checkpoint URI, config hash; without it the output does not exist

One branch-point sample (`__key__` = BranchPoint.group_id, e.g. `000003_k04`):

    meta.json              kind, step k, sigma and sigma_next (BranchPoint.t and t_next: t_k and t_{k+1}),
                           prompt id/index, group id, child keys, seeds
    tensors.safetensors    x_k [C,H,W] (once), x_next [K,C,H,W] in the model's half precision when it
                           runs in one (else float32), log_prob [K] float32, seeds [K]; shards written
                           before also hold final_latents [K,C,H,W] (read, not needed)
    c00.png .. cKK.png     each child's decoded image (lossless)

One plain-trajectory sample (`__key__` = Trajectory.key): meta.json, tensors.safetensors
(states [T+1,C,H,W] in the model's half precision or float32, log_probs [T]) and image.png.

Scores (rewards, advantages) live beside the shards under `{prefix}/{name}/`: scores.safetensors
and their own manifest.json, keyed by the child / trajectory keys.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tempflow_core.shards.errors import SchemaError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # the versions a reader of this schema takes
MANIFEST_NAME = "manifest.json"
EMBEDS_NAME = "embeds.safetensors"
PROMPTS_NAME = "prompts.json"
SCORES_NAME = "scores.safetensors"
SHARD_PATTERN = "shard-{:06d}.tar"
# Pickle-based formats: a sample holding one is refused on write and on read (never loaded).
FORBIDDEN_EXTENSIONS = frozenset({"pth", "pt", "pickle", "pkl", "pyd"})

SAMPLE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # sample, child and scores-name keys


def check_sample_key(key: str, field_name: str) -> str:
    """`key` if it is a valid sample / scores key, else SchemaError naming `field_name`.

    No dots: webdataset splits member names at the first dot.
    """
    if not isinstance(key, str) or not SAMPLE_KEY.match(key):
        raise SchemaError(f"{field_name} {key!r} is not a valid sample key: use letters, digits, '_' and '-' "
                          "(no dots: webdataset splits member names at the first dot)")
    return key


def is_forbidden_member(member: str) -> bool:
    """Whether a member name has a pickle-based extension anywhere ('x.pth', 'a.pkl.gz')."""
    return not FORBIDDEN_EXTENSIONS.isdisjoint(member.lower().split("."))


def json_bytes(obj: Any, where: str) -> bytes:
    """Compact, key-sorted JSON (same object -> same bytes); SchemaError naming `where` otherwise."""
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{where}: not JSON-serialisable: {exc}") from None
