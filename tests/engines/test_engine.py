"""The local engine (tempflow_core.engines.engine) under a run's StoredRun: the stages in this process,
the GPU slot held around rollout and update only, and progress bars whose totals are the ticks the
stages make."""

from __future__ import annotations

import contextlib

import pytest

from tempflow_core.run import stages
from tempflow_core.config import load_config
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.engines.engine import LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import read_rollouts


# one unit per branch point / per trained step; a weighted draw of 3 may draw a step twice, and the
# learner runs one unit per distinct step drawn
@pytest.mark.parametrize("algorithm", ["tempflow", "flow_grpo", "weighted"])
def test_the_local_engine_runs_the_stages_holding_the_gpu_slot_and_ticks_its_bars_to_their_totals(
        tiny_model_dir, tmp_path, algorithm):
    draw = ["rollout.branch_steps=3", "rollout.branch_draw=weighted"] if algorithm == "weighted" else []
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"algorithm={algorithm.replace('weighted', 'tempflow')}",
                             *draw, "rollout.prompts_per_iter=2",
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
        run = StoredRun(cfg, lay, sessions, engine, bar=bar)
        run.init()
        plan = plan_iteration(cfg, run.schedule(), 0)
        rollouts = run.rollout(plan)
        rewards = run.score(plan, rollouts)
        metrics = run.update(plan, rollouts, rewards)
    finally:
        sessions.clear()
    assert [rollouts, rewards] == [lay.store.uri_for(lay.prefix(0, s)) for s in ("rollout", "reward")]
    assert metrics == stages.checkpoint_metrics(lay, 0) and metrics["iteration"] == 0
    assert all(lay.complete(0, s) for s in ("rollout", "reward", "learner"))
    assert held == ["in", "out", "in", "out"]  # rollout and update, not the reward
    assert set(bars) == {"iter 0 rollout", "iter 0 learner"}
    assert bars["iter 0 rollout"] == [4 * 2, 4 * 2]  # T steps x slices
    # tempflow: 2 prompts x 3 branch points (0..T-2) x 2 epochs; flow_grpo: 2 x 3 trajectories x 3 steps x 2;
    # weighted: 2 prompts x the distinct steps the rollout branched at x 2 epochs
    branched = {bp.step for bp in read_rollouts(lay.store, lay.prefix(0, "rollout"), images=False).branch_points}
    units = {"tempflow": 2 * 3 * 2, "flow_grpo": 2 * 3 * 3 * 2, "weighted": 2 * len(branched) * 2}[algorithm]
    assert bars["iter 0 learner"] == [units, units]
