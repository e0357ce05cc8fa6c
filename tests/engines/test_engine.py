"""The local engine (tempflow_core.engines.engine): the stages in this process, the GPU slot held around
rollout and update only, and progress bars whose totals are the ticks the stages make."""

from __future__ import annotations

import contextlib

import pytest

from tempflow_core.run import stages
from tempflow_core.config import load_config
from tempflow_core.engines.engine import LocalEngine, update_units
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache


@pytest.mark.parametrize("algorithm", ["tempflow", "flow_grpo"])  # one unit per branch point / per trained step
def test_the_local_engine_runs_the_stages_holding_the_gpu_slot_and_ticks_its_bars_to_their_totals(
        tiny_model_dir, tmp_path, algorithm):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"algorithm={algorithm}", "rollout.prompts_per_iter=2",
                             "rollout.group_size=3", "sampling.num_steps=4", "lora.rank=4", "train.minibatches=2",
                             "train.inner_epochs=2", "rollout.slices=2", f"pipeline.store={tmp_path / 'store'}",
                             "prompts.source=builtin:colors"])
    held: list[str] = []
    bars: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def hold():
        held.append("in")
        yield
        held.append("out")

    @contextlib.contextmanager
    def bar(total: int, description: str):
        ticks = bars.setdefault(description, [total, 0])
        yield lambda n: ticks.__setitem__(1, ticks[1] + n)

    engine, lay, sessions = LocalEngine(hold=hold), RunLayout.open(cfg, "local"), SessionCache()
    try:
        stages.init_stage(cfg, lay, sessions)
        uris = [engine.rollout(cfg, lay, 0, sessions, bar=bar), engine.score(cfg, lay, 0, sessions),
                engine.update(cfg, lay, 0, sessions, bar=bar)]
    finally:
        sessions.clear()
    assert uris == [lay.store.uri_for(lay.prefix(0, s)) for s in ("rollout", "reward", "learner")]
    assert all(lay.complete(0, s) for s in ("rollout", "reward", "learner"))
    assert held == ["in", "out", "in", "out"]  # rollout and update, not the reward
    assert set(bars) == {"iter 0 rollout", "iter 0 learner"}
    assert bars["iter 0 rollout"] == [4 * 2, 4 * 2]  # T steps x slices
    units = update_units(cfg, 0)
    # tempflow: 2 prompts x 3 branch points (0..T-2) x 2 epochs; flow_grpo: 2 x 3 trajectories x 3 steps x 2
    assert units == (2 * 3 * 2 if algorithm == "tempflow" else 2 * 3 * 3 * 2)
    assert bars["iter 0 learner"] == [units, units]
