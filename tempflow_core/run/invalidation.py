"""Which stage outputs a changed setting invalidates: what a branched run may reuse.

A run branched from another (`runs.branch_run`, the CLI's `--resume RUN --from STAGE`)
copies every output of RUN upstream of (iteration n, STAGE): the initial adapter, all
outputs of iterations < n and those of iteration n before STAGE. A setting that differs
between the two configs must not reach any copied output. `AFFECTS` says, per setting,
which kinds of output it changes directly:

    init     the initial adapter and shuffling RNG (checkpoint -1)
    rollout  samples, log-probs, prompt stream positions
    reward   scores
    learner  checkpoints (LoRA, AdamW, RNG, EMA)
    eval     evaluations (a leaf: nothing is computed from them)

Data flows init -> rollout -> reward -> learner -> next rollout, so an affected kind that
is copied spoils everything copied after it. `plan_branch` decides: evaluations of changed
eval settings are recomputed instead of copied; an affected initial adapter is recomputed
when nothing else is copied (`--from rollout` at iteration 0); anything else is refused,
with a message naming the settings and the outputs they would reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

INIT, ROLLOUT, REWARD, LEARNER, EVAL = "init", "rollout", "reward", "learner", "eval"
ORDER = (ROLLOUT, REWARD, LEARNER, EVAL)  # stages of one iteration
_ALL = frozenset({INIT, ROLLOUT, LEARNER, EVAL})  # what the model computes (not the reward)
_SAMPLER = frozenset({ROLLOUT, LEARNER})  # the SDE grid the learner re-evaluates log-probs on
_NONE: frozenset[str] = frozenset()

# every leaf of RunConfig (tests check the table covers them); dict-valued settings cover their keys
AFFECTS: dict[str, frozenset[str]] = {
    "algorithm": frozenset({ROLLOUT, LEARNER}),  # branched vs plain rollouts; std mode and weights
    **{f"model.{f}": _ALL for f in ("path", "dtype", "max_sequence_length", "resolution", "num_frames", "device")},
    **{f"model.tiny.{f}": _ALL for f in ("family", "resolution", "vae_channels", "latent_channels", "layers", "heads",
                                          "head_dim", "patch_size", "text_width", "text_layers", "max_tokens",
                                          "seed")},
    **{f"lora.{f}": _ALL for f in ("rank", "alpha", "init", "target_modules")},
    "sampling.num_steps": _SAMPLER,
    "sampling.noise_level": _SAMPLER,
    "sampling.sde_type": _SAMPLER,
    "sampling.guidance_scale": _SAMPLER | {EVAL},  # CFG of rollouts, of the learner's log-probs, of eval
    "sampling.shift": _SAMPLER | {EVAL},
    "sampling.eval_num_steps": frozenset({EVAL}),
    **{f"rollout.{f}": frozenset({ROLLOUT}) for f in ("prompts_per_iter", "group_size", "branch_steps", "max_batch",
                                                      "slices", "completion_stride")},
    "rollout.branch_draw": frozenset({ROLLOUT, LEARNER}),  # which steps branch, and their importance in the loss
    # where work runs (pipeline.engine=ray), not what it computes (the learner's ranks: up to float summation order)
    **{f"{section}.workers": _NONE for section in ("rollout", "reward", "train")},
    "train.sharding": _NONE,  # the learner's ranks holding shards of the transformer: the same update
    "reward.stream": _NONE,  # when the slices are scored, not what they score
    # where tensors live, not what is computed (tests/algorithm/test_memory.py: the same rollout bit for bit)
    "model.offload_text_encoders": _NONE,
    "rollout.children_on_host": _NONE,
    "rollout.decode_chunk": frozenset({ROLLOUT, EVAL}),  # the VAE's batch shape: a GPU may round images apart
    "train.recompute_old_log_probs": frozenset({LEARNER}),  # the old log-probs the ratio divides by
    **{f"loss.{f}": frozenset({LEARNER}) for f in ("clip_range", "adv_clip_max", "beta", "kl_form",
                                                   "weight_norm", "weight_constant")},
    "train.iterations": _NONE,  # no schedule depends on the total: outputs of iteration i stay the same
    **{f"train.{f}": frozenset({LEARNER}) for f in ("lr", "betas", "weight_decay", "eps", "grad_clip", "inner_epochs",
                                                    "minibatches", "micro_batch", "train_steps",
                                                    "gradient_checkpointing")},
    "train.ema_decay": frozenset({LEARNER, EVAL}),  # checkpoints hold the EMA; eval scores it
    "train.ema_update_interval": frozenset({LEARNER, EVAL}),
    "train.seed": frozenset({INIT, ROLLOUT, LEARNER}),  # LoRA init, prompt order and noise, shuffling
    "reward.name": frozenset({REWARD, EVAL}),
    "reward.weights": frozenset({REWARD, EVAL}),
    "reward.options": frozenset({REWARD, EVAL}),
    "reward.plugins": frozenset({REWARD, EVAL}),  # which code a reward name means
    "prompts.source": frozenset({ROLLOUT, EVAL}),  # eval falls back to it
    "prompts.test_source": frozenset({EVAL}),
    **{f"eval.{f}": frozenset({EVAL}) for f in ("every", "prompts", "max_prompts", "images_per_prompt",
                                                "images_per_category", "extra_reward", "seed", "guidance_scale")},
    **{f"guard.{f}": _NONE for f in ("max_bad_iterations", "zero_spread_fraction")},
    **{f"pipeline.{f}": _NONE for f in ("store", "shared_store", "s3_endpoint_url", "samples_per_shard", "mlflow_uri", "experiment",
                                        "registered_model", "grid_every", "gpu_limit", "engine", "placement",
                                        "ray_gpus")},
    "output_dir": _NONE,
}


def affected(setting: str) -> frozenset[str]:
    """The kinds of output a setting (a dotted path, maybe into a dict-valued field) changes."""
    parts = setting.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in AFFECTS:
            return AFFECTS[key]
    raise KeyError(f"setting {setting!r} is not in the invalidation table (tempflow_core/run/invalidation.py)")


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two config dumps."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, Mapping) and isinstance(b, Mapping) and path not in AFFECTS:
            out += changed_settings(a, b, f"{path}.")
        elif a != b:
            out.append(path)
    return out


@dataclass(frozen=True)
class BranchPlan:
    """What a branch copies; `refusal` says why it must not happen (None: it may)."""

    copy_init: bool = True
    copy_eval: bool = True
    refusal: str | None = None


def copied_kinds(from_stage: str, from_iteration: int) -> set[str]:
    """The kinds of output a branch from (from_iteration, from_stage) copies."""
    kinds = {INIT} | (set(ORDER) if from_iteration > 0 else set())
    return kinds | set(ORDER[:ORDER.index(from_stage)])


def plan_branch(old: Mapping[str, Any], new: Mapping[str, Any], from_stage: str, from_iteration: int) -> BranchPlan:
    """Decide what a branch from (from_iteration, from_stage) may copy, given the source run's
    config dump `old` and the new run's `new` (see the module docstring)."""
    changed = changed_settings(old, new)
    hits = {s: affected(s) for s in changed}
    kinds = set().union(*hits.values()) if hits else set()
    copied = copied_kinds(from_stage, from_iteration)
    copy_eval = EVAL not in kinds
    spoiled = (kinds - {EVAL}) & copied
    if spoiled == {INIT} and copied == {INIT}:  # only the initial adapter would be reused: make it anew
        return BranchPlan(copy_init=False, copy_eval=copy_eval)
    if not spoiled:
        return BranchPlan(copy_eval=copy_eval)
    why = ", ".join(f"{s} (changes {'/'.join(sorted(hits[s] - {EVAL}))})" for s in changed if hits[s] & spoiled)
    reused = ", ".join(k for k in (INIT, *ORDER) if k in spoiled)
    where = f"stage {from_stage!r} of iteration {from_iteration}"
    return BranchPlan(refusal=(
        f"a branch from {where} would reuse {reused} outputs (and what was computed from them) that these changed "
        f"settings invalidate: {why}; "
        "branch from an earlier stage or iteration (init/rollout changes: from 'rollout' at iteration 0)"))
