"""A training run, top to bottom: what one iteration of GRPO on a flow model is, in the paper's words.

    ctx.init()                                        the seeded LoRA init (checkpoint -1)
    for i in 0 .. train.iterations-1:
        plan     = plan_iteration(cfg, grid, i)       branch points, their counts and noise-aware weights,
                                                      completion nodes, rows (iteration.py)
        rollouts = ctx.rollout(plan)                  from checkpoint i-1: ODE to each branch point, one SDE
                                                      step, ODE to the end (trajectory branching); plain SDE
                                                      trajectories for the Flow-GRPO variants
        rewards  = ctx.score(plan, rollouts)          every final image's reward: a process reward per
                                                      branch point
        metrics  = ctx.update(plan, rollouts, rewards)   group-std advantages (global std for flow_grpo),
                                                      then the clipped policy update with the plan's step
                                                      weights, its KL and EMA: checkpoint i
        the reward guard stops a reward without signal
        if the evaluation is due: ctx.evaluate(i)     the held-out evaluation of checkpoint i

This function is the only description of an iteration; what varies is the `Context` it is handed,
which owns where the work runs and what is kept of it:

    algorithm/train.py       InMemory     one session, nothing stored (train_in_process: tests, sweeps)
    engines/stored_run.py    StoredRun    stage outputs on the run's store, finished ones reused and
                                          damaged ones healed (run/stages.py), the work placed by the
                                          run's engine (here, or Ray actors and a Ray Train group)
    tasks/stages.py          FlowStages   StoredRun with each stage a Prefect task (flows/train.py)

Names: a step of the controller is named for what it does (rollout, score, update, evaluate); a
stage on the store, its Prefect task and its prefix for what it writes (rollout, reward, learner,
eval: run/layout.py), the names that stored runs and `tempflow train --resume RUN --from STAGE` use.

The advantages are computed inside `update` because that is where the rewards of the whole
stage are read (every data-parallel rank computes them over all samples; a group needs all its
rewards): algorithm/train.update_inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tempflow_core.algorithm.iteration import IterationPlan, plan_iteration
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.config import RunConfig


class DegenerateRewardError(RuntimeError):
    """The reward gave no learning signal for too long (all zero, NaN-free but flat groups)."""


def guard_check(cfg: RunConfig, history: list[dict[str, float]]) -> None:
    """Stop when the last max_bad_iterations+1 iterations were all degenerate."""
    g = cfg.guard
    recent = history[-(g.max_bad_iterations + 1):]
    if len(recent) <= g.max_bad_iterations:
        return

    def bad(m: dict[str, float]) -> bool:
        return m.get("adv/frac_zero_std_groups", 0.0) >= g.zero_spread_fraction or m.get("reward/frac_zero", 0.0) >= 1.0

    if all(bad(m) for m in recent):
        last = recent[-1]
        raise DegenerateRewardError(
            f"reward {cfg.reward.name!r} gave no learning signal for {len(recent)} consecutive iterations "
            f"(share of groups with zero reward spread {last.get('adv/frac_zero_std_groups', 0):.2f}, "
            f"share of zero rewards {last.get('reward/frac_zero', 0):.2f}); check the reward setup "
            f"(guard.max_bad_iterations={g.max_bad_iterations})")


def eval_due(cfg: RunConfig, iteration: int) -> bool:
    """The run's evaluation schedule: every eval.every iterations (0: never) and after the last."""
    last = iteration == cfg.train.iterations - 1
    return last or (cfg.eval.every > 0 and (iteration + 1) % cfg.eval.every == 0)


class Context(Protocol):
    """Where a run's stages run and what is kept of them. `rollout` and `score` return whatever the
    context hands on to the next stage (a batch in memory, a stage's URI on a store)."""

    def init(self) -> None: ...

    def schedule(self) -> Schedule: ...  # the policy's sampling grid, which weights and draws the steps

    def rollout(self, plan: IterationPlan) -> Any: ...

    def score(self, plan: IterationPlan, rollouts: Any) -> Any: ...

    def update(self, plan: IterationPlan, rollouts: Any, rewards: Any) -> dict[str, float]: ...

    def evaluate(self, iteration: int) -> dict[str, Any]: ...


def _ignore(iteration: int, values: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    on_iteration: Callable[[int, dict[str, float]], None] = _ignore  # tracking, logs, cost accounting
    on_eval: Callable[[int, dict[str, Any]], None] = _ignore  # tracking, points of a learning curve
    eval_at: Callable[[int], bool] | None = None  # None: eval_due on the run's config


@dataclass
class RunResult:
    history: list[dict[str, float]] = field(default_factory=list)  # the metrics of every iteration
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)  # iteration -> evaluation result


def train(cfg: RunConfig, ctx: Context, hooks: Hooks = Hooks(), result: RunResult | None = None) -> RunResult:
    """cfg.train.iterations iterations on `ctx` (see the module docstring); `result` (given) fills as
    the run goes, so a caller sees what finished when a stage raises."""
    result = result if result is not None else RunResult()
    eval_at = hooks.eval_at or (lambda it: eval_due(cfg, it))
    ctx.init()
    grid: Schedule | None = None
    for i in range(cfg.train.iterations):
        grid = grid or ctx.schedule()
        plan = plan_iteration(cfg, grid, i)
        rollouts = ctx.rollout(plan)
        rewards = ctx.score(plan, rollouts)
        metrics = ctx.update(plan, rollouts, rewards)
        result.history.append(metrics)
        hooks.on_iteration(i, metrics)
        guard_check(cfg, result.history)
        if eval_at(i):
            result.evals[i] = ctx.evaluate(i)
            hooks.on_eval(i, result.evals[i])
    return result
