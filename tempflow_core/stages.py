"""The pipeline's stages as plain functions over an object store (no Prefect, no MLflow).

Each stage reads its inputs from, and writes its output to, a deterministic prefix:

    {run}/init/learner/           the initial adapter (seeded LoRA init), a checkpoint
    {run}/iter-000003/rollout/    webdataset shards + manifest   (stage "rollout")
    {run}/iter-000003/reward/     rewards keyed by sample key    (stage "reward")
    {run}/iter-000003/advantages/ advantages keyed by sample key (written by "learner")
    {run}/iter-000003/learner/    checkpoint_3                   (stage "learner")
    {run}/iter-000003/eval/       scores + image grid            (stage "eval")

A stage whose manifest exists is not recomputed: that is what makes a retried or resumed
run continue where it stopped. Every stage is a deterministic function of the config and
its inputs, so a run killed anywhere and resumed ends with the same LoRA, byte for byte.
A finished output is used only when its objects match its manifest and its recorded inputs
are still the ones on the store; a damaged or stale one is moved aside and recomputed, and
a stage whose input turns out damaged while it reads it heals that input and tries again
(healing.py).

The stages that need the model take a `SessionCache` (session.py) from their caller, which
owns the model's lifetime; each restores the state it needs from the previous checkpoint,
so its result does not depend on what the session did before. Prefixes: layout.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable

import torch

from .checkpoint import CheckpointState, load_checkpoint, read_state, save_checkpoint
from . import healing
from .config import RunConfig
from .evaluation import eval_prompts, evaluate_policy
from .layout import RunLayout
from .prompts import PromptRecord
from .rewards import reward_servers
from .seeding import derive_seed
from .session import Session, SessionCache, restore
from .shards import (
    Manifest, ObjectInfo, SchemaError, ShardIntegrityError, StageNotFound, read_embeds, read_rollouts, read_scores,
    require_manifest, write_manifest, write_rollouts, write_scores,
)
from .storage import join_key
from .train import reward_metrics, run_rollout, run_update_with_advantages, score_rollout

log = logging.getLogger("tempflow.stages")

# an input that is absent, corrupt or unreadable while a stage reads it: heal it and retry once
_DAMAGED_INPUT = (ShardIntegrityError, StageNotFound, SchemaError)


def _ensure(layout: RunLayout, iteration: int, stage: str, inputs: Callable[[], dict[str, str | None]],
            compute: Callable[[], None], upstream: Callable[[], None]) -> None:
    """Use the finished output at (iteration, stage) if it is intact and made from the current
    inputs; otherwise (re)compute it. An input found damaged while computing is healed by
    `upstream` (which checks, and if need be recomputes, every input) and the stage retried once."""
    found = healing.check(layout, iteration, stage, inputs())
    if found is True:
        return
    try:
        compute()
    except _DAMAGED_INPUT as exc:
        log.warning("%s: an input is damaged (%s); healing the inputs and retrying", layout.uri(iteration, stage), exc)
        upstream()
        compute()
    if isinstance(found, healing.Quarantined):
        healing.compare(layout, iteration, stage, found)


def _checkpoint(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> None:
    """Make sure checkpoint `iteration` (-1: the initial adapter) is there and intact."""
    if iteration < 0:
        init_stage(cfg, layout, sessions)
    else:
        learner_stage(cfg, layout, iteration, sessions)


def _at_checkpoint(sessions: SessionCache, cfg: RunConfig, layout: RunLayout, iteration: int,
                   with_optimizer: bool) -> tuple[Session, CheckpointState]:
    """The session of `cfg` in the state of checkpoint `iteration` (-1: the initial adapter)."""
    s = sessions.get(cfg)
    ck = load_checkpoint(layout.store, layout.prefix(iteration, "learner"))
    restore(s, ck, with_optimizer)
    return s, ck


def init_stage(cfg: RunConfig, layout: RunLayout, sessions: SessionCache) -> str:
    """Write the initial adapter (the seeded LoRA init) as checkpoint -1, once per run."""
    prefix = layout.prefix(-1, "learner")

    def compute() -> None:
        s = sessions.get(cfg)
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "minibatch-shuffle"))
        init = CheckpointState(-1, 0, s.init_lora, None, gen.get_state(),
                               {"config_digest": cfg.digest(), "base_model": cfg.model.path or "tiny-random"})
        save_checkpoint(layout.store, prefix, init, s.policy.lora_metadata(), producer={"stage": "init", "inputs": {}})

    _ensure(layout, -1, "learner", dict, compute, lambda: None)
    return layout.store.uri_for(prefix)


def _records_json(records: list[PromptRecord]) -> list[dict[str, Any]]:
    return [{"id": r.id, "text": r.text, "metadata": r.metadata} for r in records]


def _records_from(m: Manifest) -> list[PromptRecord]:
    return [PromptRecord(r["id"], r["text"], r.get("metadata", {})) for r in m.extra["records"]]


def rollout_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                  progress: Callable[[int], None] | None = None) -> str:
    """Sample iteration i's rollouts with checkpoint i-1 and write them as shards."""
    prefix = layout.prefix(iteration, "rollout")

    def inputs() -> dict[str, str | None]:
        return {"checkpoint": healing.stage_digest(layout, iteration - 1, "learner")}

    def compute() -> None:
        s, ck = _at_checkpoint(sessions, cfg, layout, iteration - 1, with_optimizer=False)
        ck_prefix = layout.prefix(iteration - 1, "learner")
        s.stream.position = ck.stream_position
        t0 = time.perf_counter()
        records = s.stream.next_batch(cfg.rollout.prompts_per_iter)
        batch = run_rollout(s, records, iteration, progress)
        seconds = time.perf_counter() - t0
        write_rollouts(
            batch, layout.store, prefix, samples_per_shard=cfg.pipeline.samples_per_shard,
            checkpoint_uri=layout.store.uri_for(ck_prefix), config_hash=cfg.digest(),
            producer={"stage": "rollout", "iteration": iteration, "run": layout.run_id, "inputs": inputs()},
            extra={"records": _records_json(records), "stream_position": s.stream.position, "iteration": iteration,
                   "noise_level": s.schedule.noise_level,  # resolved: the family's default when unset
                   "nfe": batch.nfe, "forward_calls": batch.forward_calls, "seconds": seconds},
        )

    _ensure(layout, iteration, "rollout", inputs, compute,
            lambda: _checkpoint(cfg, layout, iteration - 1, sessions))
    return layout.store.uri_for(prefix)


def reward_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str:
    """Score the stored rollouts; the shards are never rewritten."""
    base = layout.iteration_prefix(iteration)

    def inputs() -> dict[str, str | None]:
        return {"rollout": healing.stage_digest(layout, iteration, "rollout")}

    def compute() -> None:
        s = sessions.get(cfg)
        rp = layout.prefix(iteration, "rollout")
        m = require_manifest(layout.store, rp, kind="rollouts")
        batch = read_rollouts(layout.store, rp, images=True)
        records = _records_from(m)
        rewards, details = score_rollout(s.reward_fn, batch, records)
        meta: dict[str, Any] = {"reward": cfg.reward.name, "weights": cfg.reward.weights}
        servers = reward_servers(s.reward_fn)  # remote parts: the server's url, reward name and version
        if servers:
            meta["servers"] = servers
        write_scores(layout.store, base, "reward", batch.sample_keys(), {"reward": rewards, **details},
                     meta=meta,
                     producer={"stage": "reward", "iteration": iteration, "run": layout.run_id, "inputs": inputs()},
                     config_hash=cfg.digest())

    _ensure(layout, iteration, "reward", inputs, compute, lambda: rollout_stage(cfg, layout, iteration, sessions))
    return layout.store.uri_for(join_key(base, "reward"))


def learner_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                  progress: Callable[[int], None] | None = None) -> str:
    """Advantages and one GRPO update from checkpoint i-1; writes checkpoint i (manifest last)."""
    prefix = layout.prefix(iteration, "learner")

    def inputs() -> dict[str, str | None]:
        return {"checkpoint": healing.stage_digest(layout, iteration - 1, "learner"),
                "rollout": healing.stage_digest(layout, iteration, "rollout"),
                "reward": healing.stage_digest(layout, iteration, "reward")}

    def compute() -> None:
        s, _ = _at_checkpoint(sessions, cfg, layout, iteration - 1, with_optimizer=True)
        prev = layout.prefix(iteration - 1, "learner")
        rp = layout.prefix(iteration, "rollout")
        m = require_manifest(layout.store, rp, kind="rollouts")
        batch = read_rollouts(layout.store, rp, images=False)
        if not torch.equal(batch.sigmas.to(s.schedule.sigmas.dtype), s.schedule.sigmas) or \
                m.extra.get("noise_level", s.schedule.noise_level) != s.schedule.noise_level:
            raise ValueError(f"rollouts at {layout.store.uri_for(rp)} were sampled on another grid (sampling.num_steps, "
                             "shift or noise_level differ from this config); the learner would mis-index their steps")
        scores = read_scores(layout.store, layout.iteration_prefix(iteration), "reward")
        keys = batch.sample_keys()
        rewards = scores.aligned(keys, "reward")
        details = {k: scores.aligned(keys, k) for k in scores.values if k != "reward"}
        t0 = time.perf_counter()
        metrics, adv = run_update_with_advantages(s, batch, rewards, progress)
        metrics.update(reward_metrics(batch, rewards, details))
        metrics.update({"iteration": iteration, "rollout/nfe": m.extra.get("nfe", 0),
                        "rollout/forward_calls": m.extra.get("forward_calls", 0),
                        "time/rollout_s": m.extra.get("seconds", 0.0), "time/learner_s": time.perf_counter() - t0})
        write_scores(layout.store, layout.iteration_prefix(iteration), "advantages", keys, {"advantage": adv},
                     producer={"stage": "learner", "iteration": iteration, "run": layout.run_id},
                     config_hash=cfg.digest(), overwrite=True)
        state = CheckpointState(
            iteration, int(m.extra["stream_position"]), s.policy.lora_state_dict(), s.optimizer.state_dict(),
            s.generator.get_state(),
            {"config_digest": cfg.digest(), "parent_checkpoint": layout.store.uri_for(prev),
             "rollouts": layout.store.uri_for(rp), "metrics": metrics},
            s.ema,
        )
        save_checkpoint(layout.store, prefix, state, s.policy.lora_metadata(),
                        producer={"stage": "learner", "iteration": iteration, "inputs": inputs()})

    def upstream() -> None:
        _checkpoint(cfg, layout, iteration - 1, sessions)
        rollout_stage(cfg, layout, iteration, sessions)
        reward_stage(cfg, layout, iteration, sessions)

    _ensure(layout, iteration, "learner", inputs, compute, upstream)
    return layout.store.uri_for(prefix)


def rollout_grid(layout: RunLayout, iteration: int) -> dict[str, Any] | None:
    """The grid iteration i's rollouts were sampled on: sigmas [T+1] and noise level a, as
    stored (the family's defaults resolved at sampling time); None for rollouts written
    before the manifest kept the noise level."""
    prefix = layout.prefix(iteration, "rollout")
    m = require_manifest(layout.store, prefix, kind="rollouts")
    if "noise_level" not in m.extra:
        return None
    _, sigmas = read_embeds(layout.store, prefix, m)
    return {"sigmas": [float(x) for x in sigmas], "noise_level": float(m.extra["noise_level"])}


def checkpoint_metrics(layout: RunLayout, iteration: int) -> dict[str, float]:
    """The metrics the learner recorded in checkpoint i (reads state.json only)."""
    return read_state(layout.store, layout.prefix(iteration, "learner")).get("info", {}).get("metrics", {})


def eval_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache) -> str:
    """ODE samples of checkpoint i on held-out prompts: reward, per-category scores, a grid."""
    prefix = layout.prefix(iteration, "eval")

    def inputs() -> dict[str, str | None]:
        return {"checkpoint": healing.stage_digest(layout, iteration, "learner")}

    def compute() -> None:
        s, ck = _at_checkpoint(sessions, cfg, layout, iteration, with_optimizer=False)
        if ck.ema is not None:  # evaluate the EMA weights when EMA is on
            s.policy.load_lora_state_dict(ck.ema)
        result, grid_png = evaluate_policy(cfg, s.policy, s.reward_fn, eval_prompts(cfg))
        result["weights"] = "ema" if ck.ema is not None else "raw"
        objects = {}
        for name, data in (("eval.json", json.dumps(result, indent=1, sort_keys=True).encode()),
                           ("grid.png", grid_png)):
            layout.store.put_bytes(join_key(prefix, name), data)
            objects[name] = ObjectInfo(name, hashlib.sha256(data).hexdigest(), len(data))
        write_manifest(layout.store, prefix, Manifest(kind="eval", objects=objects, config_hash=cfg.digest(),
                                                      producer={"stage": "eval", "inputs": inputs()},
                                                      extra={"iteration": iteration}))

    _ensure(layout, iteration, "eval", inputs, compute, lambda: learner_stage(cfg, layout, iteration, sessions))
    return layout.store.uri_for(prefix)


def read_eval(layout: RunLayout, iteration: int) -> dict[str, Any]:
    prefix = layout.prefix(iteration, "eval")
    require_manifest(layout.store, prefix, kind="eval")
    return json.loads(layout.store.get_bytes(join_key(prefix, "eval.json")))
