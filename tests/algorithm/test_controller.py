"""The one description of a training run (tempflow_core.algorithm.controller): the order of its
stages and hooks, what each stage is handed, the evaluation schedule and the reward guard; the
experiment runner trains through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempflow_core.algorithm.controller import DegenerateRewardError, Hooks, RunResult, eval_due, train
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]


class _Context:
    """A context that records what the controller asks of it and hands on tagged values."""

    def __init__(self, calls: list, degenerate: bool = False) -> None:
        self.calls, self.degenerate = calls, degenerate

    def init(self) -> None:
        self.calls.append(("init",))

    def schedule(self):
        self.calls.append(("schedule",))
        return make_schedule(6, 3.0, 0.7)

    def rollout(self, plan):
        self.calls.append(("rollout", plan.iteration, plan.steps))
        return f"rollouts {plan.iteration}"

    def score(self, plan, rollouts):
        self.calls.append(("score", plan.iteration, rollouts))
        return f"rewards {plan.iteration}"

    def update(self, plan, rollouts, rewards):
        self.calls.append(("update", plan.iteration, rollouts, rewards))
        it = plan.iteration
        return {"reward/mean": float(it), "adv/frac_zero_std_groups": 1.0 if self.degenerate else 0.25}

    def evaluate(self, it: int) -> dict:
        self.calls.append(("evaluate", it))
        return {"reward": 10.0 * it}


def test_the_controller_plans_rolls_out_scores_updates_tracks_then_evaluates_on_schedule():
    """Each iteration's stages get that iteration's plan (here 2 of the 5 trainable steps drawn per
    iteration, a different pair each time) and the values the stage before handed on; the grid is
    asked for once; evaluations follow the run's schedule."""
    from tempflow_core.algorithm.steps import select_steps

    cfg = load_config(None, ["train.iterations=5", "eval.every=2", "rollout.branch_steps=2", "sampling.num_steps=6"])
    calls: list = []
    hooks = Hooks(on_iteration=lambda it, m: calls.append(("tracked", it, m["reward/mean"])),
                  on_eval=lambda it, e: calls.append(("eval tracked", it, e["reward"])))
    result = train(cfg, _Context(calls), hooks)
    expected: list = [("init",), ("schedule",)]
    for it in range(5):
        steps = tuple(select_steps(2, 6, cfg.train.seed, it))  # the draw, computed independently of the plan
        expected += [("rollout", it, steps), ("score", it, f"rollouts {it}"),
                     ("update", it, f"rollouts {it}", f"rewards {it}"), ("tracked", it, float(it))]
        if it in (1, 3, 4):  # every 2 iterations and after the last
            expected += [("evaluate", it), ("eval tracked", it, 10.0 * it)]
    assert calls == expected
    assert len({c[2] for c in calls if c[0] == "rollout"}) > 1  # the draws differ between iterations
    assert [m["reward/mean"] for m in result.history] == [0.0, 1.0, 2.0, 3.0, 4.0] and sorted(result.evals) == [1, 3, 4]
    assert [eval_due(load_config(None, ["train.iterations=3"]), it) for it in range(3)] == [False, False, True]


def test_the_controller_stops_a_reward_without_signal_and_keeps_what_finished():
    cfg = load_config(None, ["train.iterations=10", "guard.max_bad_iterations=2", "reward.name=shapes"])
    calls: list = []
    result = RunResult()
    with pytest.raises(DegenerateRewardError, match=r"reward 'shapes' gave no learning signal for 3 consecutive"):
        train(cfg, _Context(calls, degenerate=True), Hooks(eval_at=lambda it: False), result)
    assert len(result.history) == 3 and [c[1] for c in calls if c[0] == "update"] == [0, 1, 2]


def test_the_experiment_runner_trains_through_the_products_loop(tiny_model_dir, tmp_path):
    """`tempflow sweep`'s run (flows/sweep.py): train_in_process with evaluations between
    iterations, which leave the training untouched (the same LoRA bytes as a run without them)."""
    from flows.sweep import run_curve
    from tempflow_core.algorithm.train import train_in_process

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "train.iterations=2", "rollout.prompts_per_iter=2",
                             "rollout.group_size=3", "lora.rank=4", "sampling.num_steps=4",
                             "sampling.eval_num_steps=4", "eval.max_prompts=4", "prompts.source=builtin:colors"])
    lines: list[str] = []
    out = run_curve("t", cfg, 1, lines.append, out_dir=str(tmp_path / "sweep"))
    assert [p["iteration"] for p in out["curve"]] == [0, 1, 2]
    assert out["curve"][1]["nfe"] > 0 and out["curve"][2]["nfe"] == 2 * out["curve"][1]["nfe"]  # cumulative rows
    plain = train_in_process(cfg, tmp_path / "plain")
    assert (tmp_path / "sweep" / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == \
        plain.lora_path.read_bytes()
