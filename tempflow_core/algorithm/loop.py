"""The training loop: one function for the Prefect flow, the in-process run and the experiment
runner, which differ only in their steps and hooks.

    for each iteration i:
        metrics = steps.iterate(i)         rollout -> reward -> update (where and how: the caller's)
        hooks.on_iteration(i, metrics)     tracking, logs, cost accounting
        guard_check(cfg, history)          a reward that gives no learning signal stops the run
        if hooks.eval_at(i):
            result = steps.evaluate(i)     the held-out evaluation of checkpoint i
            hooks.on_eval(i, result)       tracking, points of a learning curve

    flows/train.py          steps: the stage tasks on the run's engine; hooks: MLflow tracking
    algorithm/train.py      steps: the same step functions on one in-memory session (train_in_process)
    tempflow sweep          train_in_process with an evaluation schedule and points written
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

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


class Steps(Protocol):
    """What one iteration does and how a checkpoint is evaluated, where the caller runs them."""

    def iterate(self, iteration: int) -> dict[str, float]: ...

    def evaluate(self, iteration: int) -> dict[str, Any]: ...


def _ignore(iteration: int, values: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    on_iteration: Callable[[int, dict[str, float]], None] = _ignore
    on_eval: Callable[[int, dict[str, Any]], None] = _ignore
    eval_at: Callable[[int], bool] | None = None  # None: eval_due on the run's config


@dataclass
class LoopResult:
    history: list[dict[str, float]] = field(default_factory=list)  # the metrics of every iteration
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)  # iteration -> evaluation result


def train_loop(cfg: RunConfig, steps: Steps, hooks: Hooks = Hooks(), result: LoopResult | None = None) -> LoopResult:
    """cfg.train.iterations iterations of `steps`; `result` (given) fills as the loop goes, so a
    caller sees what finished when a step raises."""
    result = result if result is not None else LoopResult()
    eval_at = hooks.eval_at or (lambda it: eval_due(cfg, it))
    for it in range(cfg.train.iterations):
        metrics = steps.iterate(it)
        result.history.append(metrics)
        hooks.on_iteration(it, metrics)
        guard_check(cfg, result.history)
        if eval_at(it):
            result.evals[it] = steps.evaluate(it)
            hooks.on_eval(it, result.evals[it])
    return result
