"""What one iteration will do, decided before any work: the `IterationPlan`.

The only place that computes, for iteration i of a run,

    steps        the denoising steps it branches at (branching) or trains (plain trajectories)
    counts       how often each was drawn (1 each unless the branch draw is weighted)
    weights      the noise-aware weight w_k of every step of the trainable pool (paper eq. 8; 1 for
                 the algorithms without it), normalised over the pool, never over one draw
    importance   I_k of each drawn step (steps.importance; 1 unless the draw is weighted)
    completion   the grid nodes a child of each branch step visits after its SDE step
    rows         rollout NFEs (a CFG pair counts once), samples written, learner units

The training controller (controller.py) plans each iteration and hands the plan to its context;
a stage that runs where the model is (a worker, or a stage healing an input) plans with this
function on its own session's grid, which gives the same plan. The rollout samples `steps`, the
learner trains with `weights_of` / `importance_of`, the progress bars count `learner_units`, and
`tempflow plan` (with its `--settings` table) averages `rollout_nfe` and `learner_units` over a
run's iterations. The arithmetic of the draws lives in steps.py.

Shapes: B prompts, K group size, T denoising steps, d drawn steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tempflow_core.algorithm.rollout import completion_nodes
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.steps import draw_counts, importance, noise_aware_weights, step_pool


@dataclass(frozen=True)
class IterationPlan:
    iteration: int
    kind: Literal["branch", "plain"]
    steps: tuple[int, ...]  # [d] distinct steps: branch points, or the plain trajectories' trained steps
    counts: dict[int, int]  # step -> times drawn
    pool_weights: dict[int, float]  # every step of the trainable pool -> w_k
    importance: dict[int, float]  # drawn step -> I_k
    prompts: int  # B
    group_size: int  # K
    num_steps: int  # T
    stride: int  # rollout.completion_stride
    inner_epochs: int
    weighted_draw: bool

    def completion(self, step: int) -> list[int]:
        """Grid nodes a child of branch step `step` visits after its SDE step (rollout.completion_nodes)."""
        return completion_nodes(step, self.num_steps, self.stride)

    @property
    def rollout_nfe(self) -> int:
        """Transformer calls of the rollout (a CFG pair once): branching, the backbone's steps up to
        the last branch point and K children finishing from each; plain, K trajectories of T steps."""
        B, K, T = self.prompts, self.group_size, self.num_steps
        if self.kind == "plain":
            return B * K * T
        children = K * sum(len(self.completion(k)) - 1 for k in self.steps)
        return B * (self.steps[-1] + 1 + children)

    @property
    def samples(self) -> int:
        """Samples the rollout writes: B x d branch points (K children each), or B x K trajectories."""
        return self.prompts * (len(self.steps) if self.kind == "branch" else self.group_size)

    @property
    def units(self) -> int:
        """Training units of one pass: one per branch point, or one per trained step of a trajectory."""
        per = 1 if self.kind == "branch" else len(self.steps)
        return self.samples * per

    @property
    def learner_units(self) -> int:
        """Units the update runs (and its progress bar counts): every unit once per inner epoch."""
        return self.units * self.inner_epochs

    def weights_of(self, steps: list[int]) -> dict[int, float]:
        """w_k of `steps` (each in the trainable pool)."""
        missing = [k for k in steps if k not in self.pool_weights]
        if missing:
            raise ValueError(f"steps {missing} are not in this config's trainable steps {sorted(self.pool_weights)}: "
                             "the rollouts were made with another config")
        return {k: self.pool_weights[k] for k in steps}

    def importance_of(self, steps: list[int]) -> dict[int, float]:
        """I_k of the steps a batch of this iteration trains. Under a weighted draw they must be the
        steps this iteration drew (ValueError otherwise: shards from another config)."""
        if not self.weighted_draw:
            return {k: 1.0 for k in steps}
        if sorted(steps) != list(self.steps):
            raise ValueError(f"iteration {self.iteration}'s batch branches at steps {sorted(steps)}, and the "
                             f"weighted draw of this config picks {list(self.steps)}: the rollouts were made with "
                             "another config")
        return dict(self.importance)


def plan_iteration(cfg: Any, schedule: Schedule, iteration: int) -> IterationPlan:
    """Iteration i's plan for a run config on `schedule` (the policy's grid; its noise terms
    weight the steps and a weighted draw)."""
    T, r = schedule.num_steps, cfg.rollout
    branching = bool(cfg.branching)
    spec = r.branch_steps if branching else cfg.train.train_steps
    pool = step_pool(spec, T)
    weighted = branching and r.branch_draw == "weighted"
    noise = noise_aware_weights(schedule, pool) if weighted else None  # mean 1 over the pool
    if branching:
        counts = draw_counts(spec, T, cfg.train.seed, iteration, r.branch_draw, noise)
    else:
        counts = {k: 1 for k in pool}
    if cfg.noise_aware:
        pool_weights = noise_aware_weights(schedule, pool, cfg.loss.weight_norm, cfg.loss.weight_constant)
    else:
        pool_weights = {k: 1.0 for k in pool}
    imp = importance(counts, noise, "weighted") if weighted else {k: 1.0 for k in counts}
    return IterationPlan(iteration=iteration, kind="branch" if branching else "plain", steps=tuple(sorted(counts)),
                         counts=counts, pool_weights=pool_weights, importance=imp, prompts=r.prompts_per_iter,
                         group_size=r.group_size, num_steps=T, stride=r.completion_stride,
                         inner_epochs=cfg.train.inner_epochs, weighted_draw=weighted)
