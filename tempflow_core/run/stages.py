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

The rollout, reward and learner stages take optional runners that do their work elsewhere
(ray_engine.py: actors and a Ray Train group): the prefixes, manifests, healing and resume
above are the same whichever engine ran the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from tempflow_core import failpoints

from tempflow_core.run import healing
from tempflow_core.algorithm.checkpoint import CheckpointState, load_checkpoint, read_state, save_checkpoint
from tempflow_core.config import RunConfig
from tempflow_core.algorithm.data_parallel import DataParallel, collective_device, read_share, sample_keys_of
from tempflow_core.algorithm.evaluation import detector_rules, eval_prompts, evaluate_policy
from tempflow_core.run.layout import RunLayout
from tempflow_core.prompts import PromptRecord
from tempflow_core.rewards import reward_servers
from tempflow_core.batches import RolloutBatch
from tempflow_core.run.rollout_slices import iteration_records, sample_slice
from tempflow_core.seeding import derive_seed
from tempflow_core.algorithm.session import Session, SessionCache, restore
from tempflow_core.algorithm.sharding import full_optimizer_state
from tempflow_core.shards import (
    Manifest, ObjectInfo, RolloutPart, SchemaError, ShardIntegrityError, StageNotFound, iter_samples, publish_rollouts,
    read_embeds, read_rollouts, read_scores, require_manifest, write_manifest, write_rollouts, write_scores,
)
from tempflow_core.shards.manifest import prepare_prefix
from tempflow_core.storage import join_key
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.train import (
    reward_metrics, reward_metrics_of, run_rollout, run_update, score_rollout, update_inputs, update_units,
)

log = logging.getLogger("tempflow.stages")

# an input that is absent, corrupt or unreadable while a stage reads it: heal it and retry once
DAMAGED_INPUT = (ShardIntegrityError, StageNotFound, SchemaError)


def _ensure(layout: RunLayout, iteration: int, stage: str, inputs: Callable[[], dict[str, str | None]],
            compute: Callable[[], None], upstream: Callable[[], None]) -> None:
    """Use the finished output at (iteration, stage) if it is intact and made from the current
    inputs; otherwise (re)compute it. An input found damaged while computing is healed by
    `upstream` (which checks, and if need be recomputes, every input) and the stage retried once."""
    found = healing.check(layout, iteration, stage, inputs())
    if found is True:
        log.info("%s finished before: intact and made from the current inputs, reused as it is",
                 layout.uri(iteration, stage))
        return
    try:
        compute()
    except DAMAGED_INPUT as exc:
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
                   with_optimizer: bool, sharded: bool = False) -> tuple[Session, CheckpointState]:
    """The session of `cfg` (`sharded`: a sharded learner rank's) in the state of checkpoint
    `iteration` (-1: the initial adapter)."""
    s = sessions.get(cfg, sharded)
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


SliceRunner = Callable[[list[int]], list[RolloutPart]]  # slice indices -> their parts, written


def rollout_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                  progress: Callable[[int], None] | None = None, run_slices: SliceRunner | None = None) -> str:
    """Sample iteration i's rollouts with checkpoint i-1 and write them as shards.

    With rollout.slices > 1 each slice is sampled and written on its own (rollout_slices.py),
    by `run_slices` when given (the Ray engine's actors) or here one after the other, and the
    parts are merged into one manifest, written last."""
    prefix = layout.prefix(iteration, "rollout")

    def inputs() -> dict[str, str | None]:
        return {"checkpoint": healing.stage_digest(layout, iteration - 1, "learner")}

    def publish(records: list[PromptRecord], position: int, seconds: float, noise_level: float, nfe: int,
                calls: int, write: Callable[..., Any]) -> None:
        ck_prefix = layout.prefix(iteration - 1, "learner")
        write(checkpoint_uri=layout.store.uri_for(ck_prefix), config_hash=cfg.digest(),
              producer={"stage": "rollout", "iteration": iteration, "run": layout.run_id, "inputs": inputs()},
              extra={"records": _records_json(records), "stream_position": position, "iteration": iteration,
                     "noise_level": noise_level,  # resolved: the family's default when unset
                     "nfe": nfe, "forward_calls": calls, "seconds": seconds})

    def compute() -> None:
        if cfg.rollout.slices > 1 or run_slices is not None:
            return compute_slices()
        s, ck = _at_checkpoint(sessions, cfg, layout, iteration - 1, with_optimizer=False)
        s.stream.position = ck.stream_position
        t0 = time.perf_counter()
        records = s.stream.next_batch(cfg.rollout.prompts_per_iter)
        batch = run_rollout(s, records, plan_iteration(cfg, s.schedule, iteration), progress)
        publish(records, s.stream.position, time.perf_counter() - t0, s.schedule.noise_level, batch.nfe,
                batch.forward_calls,
                lambda **kw: write_rollouts(batch, layout.store, prefix,
                                            samples_per_shard=cfg.pipeline.samples_per_shard, **kw))

    def compute_slices() -> None:
        records, position = iteration_records(cfg, layout, iteration)
        prepare_prefix(layout.store, prefix, overwrite=False)
        t0 = time.perf_counter()
        indices = list(range(cfg.rollout.slices))
        parts = run_slices(indices) if run_slices is not None else \
            [sample_slice(cfg, layout, iteration, j, sessions, progress) for j in indices]
        noise_level = float(cfg.canonical_dump()["sampling"]["noise_level"])  # the family's when unset
        publish(records, position, time.perf_counter() - t0, noise_level, sum(p.nfe for p in parts),
                sum(p.forward_calls for p in parts),
                lambda **kw: publish_rollouts(parts, layout.store, prefix, **kw))

    _ensure(layout, iteration, "rollout", inputs, compute,
            lambda: _checkpoint(cfg, layout, iteration - 1, sessions))
    return layout.store.uri_for(prefix)


ScoreRunner = Callable[[], list["ScoredShare"]]  # every share of the stage, scored


@dataclass
class ScoredShare:
    """Rewards of one share of a rollout stage: keys [S_r] with the reward and its details."""

    keys: list[str]
    values: dict[str, np.ndarray]  # "reward" and the details, each [S_r]
    servers: list[dict[str, Any]]  # the remote parts of the reward that scored them (rewards.reward_servers)


def score_share(cfg: RunConfig, layout: RunLayout, iteration: int, rank: int, world: int, reward_fn: Any
                ) -> ScoredShare:
    """Score shards rank, rank+world, ... of iteration i's rollouts (a reward worker's share)."""
    rp = layout.prefix(iteration, "rollout")
    m = require_manifest(layout.store, rp, kind="rollouts")
    share, _ = read_share(layout.store, rp, m, rank, world, images=True)
    servers = reward_servers(reward_fn)
    if not share.branch_points and not share.trajectories:
        return ScoredShare([], {}, servers)
    rewards, details = score_rollout(reward_fn, share, _records_from(m))
    return ScoredShare(share.sample_keys(), {"reward": rewards, **details}, servers)


def score_part(cfg: RunConfig, layout: RunLayout, iteration: int, part: RolloutPart, reward_fn: Any) -> ScoredShare:
    """Score one rollout slice from the shards it wrote, before the stage's manifest exists
    (reward.stream): the share of the reward stage that slice's samples are."""
    records, _ = iteration_records(cfg, layout, iteration)
    rp = layout.prefix(iteration, "rollout")
    m = Manifest(kind="rollouts", rollout_kind=part.kind, shards=list(part.shards))
    items = list(iter_samples(layout.store, rp, manifest=m, nodesplitter=None, workersplitter=None, images=True,
                              as_dataclass=True))
    batch = RolloutBatch(part.kind, [], [], part.embeds, part.sigmas,
                         branch_points=items if part.kind == "branch" else [],
                         trajectories=items if part.kind == "plain" else [])
    rewards, details = score_rollout(reward_fn, batch, records)
    return ScoredShare(batch.sample_keys(), {"reward": rewards, **details}, reward_servers(reward_fn))


def reward_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                 run_scoring: ScoreRunner | None = None) -> str:
    """Score the stored rollouts; the shards are never rewritten. `run_scoring` scores them
    in shares instead (the Ray engine's reward actors); the scores are the same objects."""
    base = layout.iteration_prefix(iteration)

    def inputs() -> dict[str, str | None]:
        return {"rollout": healing.stage_digest(layout, iteration, "rollout"), "detector": detector_rules(cfg).name}

    def compute() -> None:
        failpoints.hit(f"reward.score/{layout.run_id}")
        rp = layout.prefix(iteration, "rollout")
        m = require_manifest(layout.store, rp, kind="rollouts")
        if run_scoring is not None:
            keys = sample_keys_of(m, cfg.rollout.group_size)
            shares = run_scoring()
            values = _merge_shares(shares, keys, layout.store.uri_for(rp))
            servers = shares[0].servers
        else:
            reward_fn = sessions.get(cfg).reward_fn
            batch = read_rollouts(layout.store, rp, images=True)
            rewards, details = score_rollout(reward_fn, batch, _records_from(m))
            keys, values = batch.sample_keys(), {"reward": rewards, **details}
            servers = reward_servers(reward_fn)  # remote parts: the server's url, reward name and version
        meta: dict[str, Any] = {"reward": cfg.reward.name, "weights": cfg.reward.weights}
        if servers:
            meta["servers"] = servers
        write_scores(layout.store, base, "reward", keys, values, meta=meta,
                     producer={"stage": "reward", "iteration": iteration, "run": layout.run_id, "inputs": inputs()},
                     config_hash=cfg.digest())

    _ensure(layout, iteration, "reward", inputs, compute, lambda: rollout_stage(cfg, layout, iteration, sessions))
    return layout.store.uri_for(join_key(base, "reward"))


def _merge_shares(shares: list[ScoredShare], keys: list[str], uri: str) -> dict[str, np.ndarray]:
    """The shares' values in the stage's key order; every key scored exactly once."""
    where = {k: (i, j) for i, sh in enumerate(shares) for j, k in enumerate(sh.keys)}
    if len(where) != len(keys) or set(where) != set(keys) or sum(len(sh.keys) for sh in shares) != len(keys):
        raise ValueError(f"reward workers scored {sum(len(sh.keys) for sh in shares)} samples of {uri}, "
                         f"which holds {len(keys)}")
    names = next(sh.values.keys() for sh in shares if sh.keys)
    return {n: np.array([shares[where[k][0]].values[n][where[k][1]] for k in keys]) for n in names}


def _learner_inputs(layout: RunLayout, iteration: int) -> dict[str, str | None]:
    return {"checkpoint": healing.stage_digest(layout, iteration - 1, "learner"),
            "rollout": healing.stage_digest(layout, iteration, "rollout"),
            "reward": healing.stage_digest(layout, iteration, "reward")}


RankRunner = Callable[[], None]  # runs learner_rank on every rank of a data-parallel group


def learner_stage(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache,
                  progress: Callable[[int], None] | None = None, run_ranks: RankRunner | None = None) -> str:
    """Advantages and one GRPO update from checkpoint i-1; writes checkpoint i (manifest last).
    `run_ranks` runs the update data-parallel instead (`learner_rank` on each rank; the Ray
    engine's Ray Train group), rank 0 writing the same outputs."""
    prefix = layout.prefix(iteration, "learner")

    def compute() -> None:
        if run_ranks is not None:
            run_ranks()
            require_manifest(layout.store, prefix, kind="checkpoint")  # rank 0 wrote it, or the group failed
            return
        s, _ = _at_checkpoint(sessions, cfg, layout, iteration - 1, with_optimizer=True)
        rp = layout.prefix(iteration, "rollout")
        m = require_manifest(layout.store, rp, kind="rollouts")
        batch = read_rollouts(layout.store, rp, images=False)
        _check_grid(s, layout, rp, m, batch.sigmas)
        keys = batch.sample_keys()
        rewards, details = _rewards(layout, iteration, keys)
        t0 = time.perf_counter()
        metrics, adv = run_update(s, batch, rewards, plan_iteration(cfg, s.schedule, iteration), progress)
        metrics.update(reward_metrics(batch, rewards, details))
        _write_learner(cfg, layout, iteration, s, m, keys, adv, metrics, time.perf_counter() - t0)

    def upstream() -> None:
        _checkpoint(cfg, layout, iteration - 1, sessions)
        rollout_stage(cfg, layout, iteration, sessions)
        reward_stage(cfg, layout, iteration, sessions)

    _ensure(layout, iteration, "learner", lambda: _learner_inputs(layout, iteration), compute, upstream)
    return layout.store.uri_for(prefix)


def learner_rank(cfg: RunConfig, layout: RunLayout, iteration: int, sessions: SessionCache, rank: int, world: int,
                 progress: Callable[[int], None] | None = None) -> None:
    """Rank `rank` of `world` of a data-parallel learner stage (data_parallel.py): reads its
    share of the shards, takes part in every all-reduce; rank 0 writes what learner_stage
    writes. Needs torch.distributed initialised (Ray Train does it)."""
    import torch.distributed as dist

    s, _ = _at_checkpoint(sessions, cfg, layout, iteration - 1, with_optimizer=True,
                          sharded=cfg.train.sharding == "fsdp")
    device = collective_device(dist.get_backend_config(), s.policy.device)  # before any work: NCCL takes cuda only
    rp = layout.prefix(iteration, "rollout")
    m = require_manifest(layout.store, rp, kind="rollouts")
    share, positions = read_share(layout.store, rp, m, rank, world)
    _check_grid(s, layout, rp, m, share.sigmas)
    keys = sample_keys_of(m, cfg.rollout.group_size)
    rewards, details = _rewards(layout, iteration, keys)
    t0 = time.perf_counter()
    inp = update_inputs(cfg, plan_iteration(cfg, s.schedule, iteration), keys, rewards, share, positions)
    dp = DataParallel(rank, world, inp.total, torch.tensor(inp.owned, dtype=torch.long), device,
                      sharded=cfg.train.sharding == "fsdp")
    metrics = update_units(s, inp.units, share.embeds, inp.weights, inp.stats, progress, dp, importance=inp.importance)
    adv = inp.advantages
    metrics.update(reward_metrics_of(m.rollout_kind or "branch", keys, rewards, details))
    # every rank gathers the state: under sharding, gathering is a collective
    lora, opt = s.policy.lora_state_dict(), full_optimizer_state(s.optimizer.state_dict())
    if rank == 0:
        _write_learner(cfg, layout, iteration, s, m, keys, adv, metrics, time.perf_counter() - t0, (lora, opt))


def _check_grid(s: Session, layout: RunLayout, rp: str, m: Manifest, sigmas: torch.Tensor) -> None:
    if not torch.equal(sigmas.to(s.schedule.sigmas.dtype), s.schedule.sigmas) or \
            m.extra.get("noise_level", s.schedule.noise_level) != s.schedule.noise_level:
        raise ValueError(f"rollouts at {layout.store.uri_for(rp)} were sampled on another grid (sampling.num_steps, "
                         "shift or noise_level differ from this config); the learner would mis-index their steps")


def _rewards(layout: RunLayout, iteration: int, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    scores = read_scores(layout.store, layout.iteration_prefix(iteration), "reward")
    return scores.aligned(keys, "reward"), {k: scores.aligned(keys, k) for k in scores.values if k != "reward"}


def _write_learner(cfg: RunConfig, layout: RunLayout, iteration: int, s: Session, m: Manifest, keys: list[str],
                   adv: np.ndarray, metrics: dict[str, float], seconds: float,
                   gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> None:
    """The learner stage's outputs: the advantages it trained on, then checkpoint i (manifest last).
    `gathered`: the LoRA and optimizer state, when the ranks have gathered them (else the session's)."""
    prev, rp = layout.prefix(iteration - 1, "learner"), layout.prefix(iteration, "rollout")
    metrics.update({"iteration": iteration, "rollout/nfe": m.extra.get("nfe", 0),
                    "rollout/rows": m.extra.get("nfe", 0) * cfg.rows_per_sample(),
                    "rollout/forward_calls": m.extra.get("forward_calls", 0),
                    "time/rollout_s": m.extra.get("seconds", 0.0), "time/learner_s": seconds})
    write_scores(layout.store, layout.iteration_prefix(iteration), "advantages", keys, {"advantage": adv},
                 producer={"stage": "learner", "iteration": iteration, "run": layout.run_id},
                 config_hash=cfg.digest(), overwrite=True)
    failpoints.hit("learner.checkpoint/rank0")
    lora, opt = gathered or (s.policy.lora_state_dict(), s.optimizer.state_dict())
    state = CheckpointState(
        iteration, int(m.extra["stream_position"]), lora, opt, s.generator.get_state(),
        {"config_digest": cfg.digest(), "parent_checkpoint": layout.store.uri_for(prev),
         "rollouts": layout.store.uri_for(rp), "metrics": metrics},
        s.ema,
    )
    save_checkpoint(layout.store, layout.prefix(iteration, "learner"), state, s.policy.lora_metadata(),
                    producer={"stage": "learner", "iteration": iteration, "inputs": _learner_inputs(layout, iteration)})


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
        return {"checkpoint": healing.stage_digest(layout, iteration, "learner"), "detector": detector_rules(cfg).name}

    def compute() -> None:
        result, grid_png = evaluate_checkpoint(cfg, layout, iteration, sessions)
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


def evaluate_checkpoint(cfg: RunConfig, layout: RunLayout, iteration: int,
                        sessions: SessionCache) -> tuple[dict[str, Any], bytes]:
    """(scores, grid PNG) of checkpoint i (its EMA weights when EMA is on) under cfg's evaluation
    settings; reads the checkpoint, writes nothing."""
    s, ck = _at_checkpoint(sessions, cfg, layout, iteration, with_optimizer=False)
    if ck.ema is not None:  # evaluate the EMA weights when EMA is on
        s.policy.load_lora_state_dict(ck.ema)
    result, grid_png = evaluate_policy(cfg, s.policy, s.reward_fn, eval_prompts(cfg))
    result["weights"] = "ema" if ck.ema is not None else "raw"
    return result, grid_png


def read_eval(layout: RunLayout, iteration: int) -> dict[str, Any]:
    prefix = layout.prefix(iteration, "eval")
    require_manifest(layout.store, prefix, kind="eval")
    return json.loads(layout.store.get_bytes(join_key(prefix, "eval.json")))
