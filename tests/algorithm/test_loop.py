"""The one training loop (tempflow_core.algorithm.loop): its order of steps and hooks, the
evaluation schedule and the reward guard; the experiment runner trains through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempflow_core.algorithm.loop import DegenerateRewardError, Hooks, LoopResult, eval_due, train_loop
from tempflow_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]


class _Steps:
    def __init__(self, calls: list, degenerate: bool = False) -> None:
        self.calls, self.degenerate = calls, degenerate

    def iterate(self, it: int) -> dict[str, float]:
        self.calls.append(("iterate", it))
        return {"reward/mean": float(it), "adv/frac_zero_std_groups": 1.0 if self.degenerate else 0.25}

    def evaluate(self, it: int) -> dict:
        self.calls.append(("evaluate", it))
        return {"reward": 10.0 * it}


def test_the_loop_iterates_tracks_then_evaluates_on_the_runs_schedule():
    cfg = load_config(None, ["train.iterations=5", "eval.every=2"])
    calls: list = []
    hooks = Hooks(on_iteration=lambda it, m: calls.append(("tracked", it, m["reward/mean"])),
                  on_eval=lambda it, e: calls.append(("eval tracked", it, e["reward"])))
    result = train_loop(cfg, _Steps(calls), hooks)
    expected = []
    for it in range(5):
        expected += [("iterate", it), ("tracked", it, float(it))]
        if it in (1, 3, 4):  # every 2 iterations and after the last
            expected += [("evaluate", it), ("eval tracked", it, 10.0 * it)]
    assert calls == expected
    assert [m["reward/mean"] for m in result.history] == [0.0, 1.0, 2.0, 3.0, 4.0] and sorted(result.evals) == [1, 3, 4]
    assert [eval_due(load_config(None, ["train.iterations=3"]), it) for it in range(3)] == [False, False, True]


def test_the_loop_stops_a_reward_without_signal_and_keeps_what_finished():
    cfg = load_config(None, ["train.iterations=10", "guard.max_bad_iterations=2", "reward.name=shapes"])
    calls: list = []
    result = LoopResult()
    with pytest.raises(DegenerateRewardError, match=r"reward 'shapes' gave no learning signal for 3 consecutive"):
        train_loop(cfg, _Steps(calls, degenerate=True), Hooks(eval_at=lambda it: False), result)
    assert len(result.history) == 3 and calls == [("iterate", 0), ("iterate", 1), ("iterate", 2)]


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
