"""Named presets rewrite a config relative to what it holds, and nothing else."""

from __future__ import annotations

import pytest

from tempflow_core.algorithm.rollout import completion_rows
from tempflow_core.config import load_config
from tempflow_core.presets import apply_preset


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("iterations,want", [(8, 4), (5, 3), (1, 1), (16, 8)])
def test_fast_branches_at_the_four_noisiest_steps_for_half_the_iterations(iterations, want):
    cfg = load_config(overrides=["algorithm=tempflow", "rollout.branch_steps=3", "rollout.branch_draw=window",
                                 f"train.iterations={iterations}"])
    out = apply_preset(cfg, "fast")
    assert out.rollout.branch_steps == [0, 1, 2, 3] and out.rollout.branch_draw == "uniform"
    assert out.train.iterations == want
    before, after = _flat(cfg.model_dump(mode="json")), _flat(out.model_dump(mode="json"))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"rollout.branch_steps", "rollout.branch_draw"} | ({"train.iterations"} if want != iterations
                                                                         else set())


def test_fast_spends_a_third_of_the_rollout_at_t10():
    # per prompt and iteration: the backbone to the last branch step, then K children from each
    # branch step k over the T - 1 - k steps left (the rollout's own count, completion_rows)
    for T, K, share in ((10, 8, 244 / 369 / 2), (10, 24, (4 + 24 * 30) / (9 + 24 * 45) / 2), (6, 8, 116 / 125 / 2)):
        cfg = load_config(overrides=[f"sampling.num_steps={T}", f"rollout.group_size={K}", "train.iterations=8"])
        fast = apply_preset(cfg, "fast")
        full = (T - 1) + completion_rows(list(range(T - 1)), T, K)
        cheap = 4 + completion_rows([0, 1, 2, 3], T, K)
        spent = fast.train.iterations * cheap / (cfg.train.iterations * full)
        assert spent == pytest.approx(share, abs=1e-9)
    assert 244 / 369 / 2 == pytest.approx(0.3306, abs=1e-4)


def test_a_preset_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="algorithm 'flow_grpo'"):
        apply_preset(load_config(overrides=["algorithm=flow_grpo"]), "fast")
    with pytest.raises(ValueError, match="sampling.num_steps 4"):
        apply_preset(load_config(overrides=["sampling.num_steps=4"]), "fast")
    with pytest.raises(ValueError, match="unknown preset 'cheap'"):
        apply_preset(load_config(), "cheap")
