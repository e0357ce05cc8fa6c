"""`train_in_process`: a training run (controller.py) on one in-memory session, without
orchestration or a store.

It is what the tests drive, the baseline the Prefect pipeline's overhead is measured against,
and what the experiment runner (`tempflow sweep`, flows/sweep.py) trains with. `InMemory` is the
controller's context on one `Session` (session.py) for the whole run. The stage functions below
(run_rollout, score_rollout, update_inputs + update_units, reward_metrics) are the ones the
pipeline's stages call too (run/stages.py), on a session they get from their caller:

    1. rollout   (no grad): branched (branch/tempflow) or plain SDE (flow_grpo*)
    2. rewards   -> advantages (group std, or global std for flow_grpo)
    3. update    inner epochs x minibatches, micro-batched, clipped + weighted + KL
    4. metrics   (metrics.jsonl), the reward guard, evaluations where asked
    -> save the LoRA (safetensors, loadable by diffusers)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tempflow_core.algorithm.advantages import AdvantageStats, compute_advantages
from tempflow_core.config import RunConfig
from tempflow_core.algorithm.data_parallel import DataParallel
from tempflow_core.algorithm.learner import TrainUnits, build_units, empty_units, update
from tempflow_core.algorithm.controller import Hooks, RunResult, train
from tempflow_core.batches import PromptEmbeds
from tempflow_core.prompts import PromptRecord
from tempflow_core.rewards import RewardFn
from tempflow_core.batches import RolloutBatch, branch_step_of_group, group_of_key
from tempflow_core.algorithm.rollout import branched_rollout, plain_rollout
from tempflow_core.seeding import derive_seed
from tempflow_core.algorithm.session import Session, evaluated_weights, optimizer_steps, setup, update_ema
from tempflow_core.algorithm.iteration import IterationPlan
from tempflow_core.algorithm.schedule import Schedule


def batch_prompt_ids(records: list[PromptRecord], start: int = 0) -> list[str]:
    """Ids unique within a batch (a prompt may appear twice), stable and dot-free; `start` is
    the slot of records[0] in the iteration's batch (a slice of it keeps its global slots)."""
    return [f"b{slot:03d}_{rec.id}" for slot, rec in enumerate(records, start)]


def run_rollout(s: Session, records: list[PromptRecord], plan: IterationPlan,
                progress: Callable[[int], None] | None = None, start: int = 0) -> RolloutBatch:
    """Stage 1: sample the plan's rollouts with the current policy. `records` may be a slice of
    the iteration's batch starting at slot `start`: noise is seeded by slot and prompt id, so a
    slice samples what the whole batch would have for its prompts."""
    cfg = s.cfg
    seed = derive_seed(cfg.train.seed, "rollout", plan.iteration)
    prompts, ids = [r.text for r in records], batch_prompt_ids(records, start)
    if plan.kind == "branch":
        return branched_rollout(s.policy, prompts, ids, s.schedule, list(plan.steps), cfg.rollout.group_size,
                                cfg.guidance_scale(), seed, cfg.rollout.max_batch, progress=progress,
                                stride=cfg.rollout.completion_stride, children_on_host=cfg.rollout.children_on_host)
    return plain_rollout(s.policy, prompts, ids, s.schedule, cfg.rollout.group_size, cfg.guidance_scale(),
                         seed, cfg.rollout.max_batch, progress=progress)


def score_rollout(reward_fn: RewardFn, batch: RolloutBatch, records: list[PromptRecord]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stage 2: rewards [S] in sample_keys order, with per-reward details."""
    idx = batch.prompt_index_per_sample()
    return reward_fn(batch.images(), [records[i].text for i in idx], [records[i].metadata for i in idx])


def run_update(s: Session, batch: RolloutBatch, rewards: np.ndarray, plan: IterationPlan,
               progress: Callable[[int], None] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Stage 3: advantages, then the plan's clipped GRPO update. Returns its metrics and the
    advantages [S] (sample_keys order) it trained on."""
    samples = len(batch.branch_points if batch.kind == "branch" else batch.trajectories)
    inp = update_inputs(s.cfg, plan, batch.sample_keys(), rewards, batch, list(range(samples)))
    metrics = update_units(s, inp.units, batch.embeds, inp.weights, inp.stats, progress, importance=inp.importance)
    return metrics, inp.advantages


@dataclass(frozen=True)
class UpdateInputs:
    """What an update trains on: one rank's share of the stage (all of it in one process)."""

    units: TrainUnits  # [n] the share's training units
    owned: list[int]  # [n] each unit's index among the stage's N units
    total: int  # N: units of the whole stage
    advantages: np.ndarray  # [S] every sample's advantage, in the stage's key order
    stats: AdvantageStats
    weights: dict[int, float]  # trained step -> w_k
    importance: dict[int, float]  # trained step -> I_k


def update_inputs(cfg: RunConfig, plan: IterationPlan, keys: list[str], rewards: np.ndarray,
                  share: RolloutBatch, positions: list[int]) -> UpdateInputs:
    """The learner's preparation, for one process or one rank: advantages over every sample of the
    stage (`keys` and `rewards` [S]: a group needs all its rewards, flow_grpo's global std the
    batch's), the trained steps with their weights and importance (the iteration's plan), and
    the units of `share`, the samples at `positions` [s] of the stage (branch points or trajectories)."""
    adv, astats = compute_advantages(rewards, [group_of_key(k) for k in keys], cfg.std_mode, cfg.loss.adv_clip_max)
    if share.kind == "branch":  # the steps the rollouts branched at (checked against the plan)
        steps, owned = sorted({branch_step_of_group(group_of_key(k)) for k in keys}), list(positions)
        total = len(keys) // cfg.rollout.group_size
    else:  # each trajectory's trained steps, in units of (trajectory, step)
        steps = list(plan.steps)
        owned = [p * len(steps) + j for p in positions for j in range(len(steps))]
        total = len(keys) * len(steps)
    weights, imp = plan.weights_of(steps), plan.importance_of(steps)
    index = {k: i for i, k in enumerate(keys)}
    local = adv[[index[k] for k in share.sample_keys()]]
    units = build_units(share, local, weights, steps, imp) if positions else empty_units(
        cfg.rollout.group_size if share.kind == "branch" else 1)
    return UpdateInputs(units, owned, total, adv, astats, weights, imp)


def update_units(s: Session, units: TrainUnits, emb: PromptEmbeds, weights: dict[int, float], astats: AdvantageStats,
                 progress: Callable[[int], None] | None = None, dp: DataParallel | None = None,
                 importance: dict[int, float] | None = None) -> dict[str, float]:
    """The clipped GRPO update over `units` (this rank's share under `dp`), the EMA along it,
    and the update's metrics."""
    cfg = s.cfg
    nfe0 = s.policy.nfe
    stats = update(s.policy, s.optimizer, units, emb, s.schedule, cfg.guidance_scale(),
                   cfg.train, cfg.loss, s.generator, progress=progress, dp=dp,
                   after_step=lambda: update_ema(s, optimizer_steps(s.optimizer)))
    learner_nfe = s.policy.nfe - nfe0  # rows through the transformer: with grad, and the KL reference's
    if dp is not None:
        learner_nfe = int(dp.reduce([learner_nfe])[0])
    out = {f"train/{k}": v for k, v in stats.items()}
    out["learner/nfe"] = learner_nfe
    out["learner/rows"] = learner_nfe * cfg.rows_per_sample()  # a CFG pair as two rows
    out.update({"adv/mean": astats.mean, "adv/std": astats.std, "adv/abs_max": astats.abs_max,
                "adv/frac_zero_std_groups": astats.frac_zero_std_groups})
    out.update({f"weight/step_{k:02d}": w for k, w in weights.items()})
    if importance is not None and any(v != 1.0 for v in importance.values()):
        out.update({f"importance/step_{k:02d}": v for k, v in importance.items()})
    return out


def reward_metrics(batch: RolloutBatch, rewards: np.ndarray, details: dict[str, np.ndarray]) -> dict[str, float]:
    """Reward mean/std overall and per branch step (the data of the paper's Figure 1)."""
    return reward_metrics_of(batch.kind, batch.sample_keys(), rewards, details)


def reward_metrics_of(kind: str, keys: list[str], rewards: np.ndarray, details: dict[str, np.ndarray]
                      ) -> dict[str, float]:
    """reward_metrics from the sample keys [S] alone (their groups and branch steps are in
    the keys), so a learner rank that holds part of the samples reports the whole stage's."""
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
           "reward/frac_zero": float(np.mean(rewards == 0)), "reward/frac_nan": float(np.mean(~np.isfinite(rewards)))}
    for name, v in details.items():
        out[f"reward/{name}/mean"] = float(np.mean(v))
    if kind == "branch":
        groups = np.array([group_of_key(k) for k in keys])
        steps = np.array([branch_step_of_group(g) for g in groups])
        for k in sorted(set(steps.tolist())):
            m = steps == k
            out[f"reward_step/mean_{k:02d}"] = float(rewards[m].mean())
            # mean within-group std at this step: the spread a branch point's children show
            gstd = [rewards[groups == gid].std() for gid in dict.fromkeys(groups[m])]
            out[f"reward_step/std_{k:02d}"] = float(np.mean(gstd))
    return out


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)  # iteration -> evaluation (when asked)
    lora_path: Path | None = None
    out_dir: Path | None = None


@dataclass(frozen=True)
class Sampled:
    """One iteration's rollouts in memory: the prompts' records and what was sampled for them."""

    records: list[PromptRecord]
    batch: RolloutBatch
    seconds: float


@dataclass(frozen=True)
class Scored:
    rewards: np.ndarray  # [S] in the batch's sample_keys order
    details: dict[str, np.ndarray]  # each reward's part, [S]
    seconds: float


class InMemory:
    """controller.Context on one in-memory session: the stage functions above, nothing stored."""

    def __init__(self, s: Session, progress: bool = False) -> None:
        self.s, self.progress = s, progress

    def init(self) -> None:
        pass  # the session holds the seeded initial adapter from setup

    def schedule(self) -> Schedule:
        return self.s.schedule

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def rollout(self, plan: IterationPlan) -> Sampled:
        s, t0 = self.s, time.perf_counter()
        records = s.stream.next_batch(plan.prompts)
        with self._bar(plan.num_steps, f"iter {plan.iteration} rollout") as bar:
            batch = run_rollout(s, records, plan, bar.update)
        return Sampled(records, batch, time.perf_counter() - t0)

    def score(self, plan: IterationPlan, rollouts: Sampled) -> Scored:
        t0 = time.perf_counter()
        rewards, details = score_rollout(self.s.reward_fn, rollouts.batch, rollouts.records)
        return Scored(rewards, details, time.perf_counter() - t0)

    def update(self, plan: IterationPlan, rollouts: Sampled, rewards: Scored) -> dict[str, float]:
        cfg, batch, t0 = self.s.cfg, rollouts.batch, time.perf_counter()
        with self._bar(plan.learner_units, f"iter {plan.iteration} learner") as bar:
            metrics, _ = run_update(self.s, batch, rewards.rewards, plan, bar.update)
        metrics.update(reward_metrics(batch, rewards.rewards, rewards.details))
        metrics.update({"iteration": plan.iteration, "rollout/nfe": batch.nfe,
                        "rollout/rows": batch.nfe * cfg.rows_per_sample(), "rollout/forward_calls": batch.forward_calls,
                        "time/rollout_s": rollouts.seconds, "time/reward_s": rewards.seconds,
                        "time/learner_s": time.perf_counter() - t0})
        return metrics

    def evaluate(self, iteration: int) -> dict[str, Any]:
        """The held-out evaluation of the current LoRA (its EMA when EMA is on, as the pipeline's)."""
        from tempflow_core.algorithm.evaluation import eval_prompts, evaluate_policy

        s = self.s
        with evaluated_weights(s):
            result, _ = evaluate_policy(s.cfg, s.policy, s.reward_fn, eval_prompts(s.cfg))
        return result


def train_in_process(cfg: RunConfig, out_dir: str | Path | None = None, progress: bool = False,
                     pipe=None, on_iteration: Callable[[int, dict[str, float]], None] | None = None,
                     eval_at: Callable[[int], bool] | None = None,
                     on_eval: Callable[[int, dict[str, Any]], None] | None = None,
                     before: Callable[[InMemory], None] | None = None) -> TrainResult:
    """Run cfg.train.iterations of the configured algorithm in this process: controller.train on
    an InMemory context.

    Args:
        out_dir: where metrics.jsonl and the final LoRA go (cfg.output_dir if None).
        progress: show tqdm bars for rollouts and learner epochs.
        pipe: an already-loaded pipeline (tests reuse one); loaded from cfg.model otherwise.
        on_iteration: called with each iteration's metrics.
        eval_at: which iterations end with a held-out evaluation (default: none), `on_eval` gets it.
        before: called with the context before the first iteration (e.g. to evaluate the base model).
    """
    out = Path(out_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    s = setup(cfg, out / "tokenizer", pipe)
    ctx = InMemory(s, progress)
    if before is not None:
        before(ctx)
    result = TrainResult(out_dir=out)
    with (out / "metrics.jsonl").open("w") as metrics_file:

        def logged(it: int, metrics: dict[str, float]) -> None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if on_iteration is not None:
                on_iteration(it, metrics)

        hooks = Hooks(on_iteration=logged, on_eval=on_eval or Hooks().on_eval, eval_at=eval_at or (lambda it: False))
        run = train(cfg, ctx, hooks, RunResult(result.history, result.evals))
    result.history, result.evals = run.history, run.evals
    result.lora_path = s.policy.save_lora(out / "lora")
    if s.ema is not None:
        with evaluated_weights(s):
            s.policy.save_lora(out / "lora_ema")
    return result
