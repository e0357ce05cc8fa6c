"""A smoke run of the ablation flow: four variants, one seed, two iterations, figures out."""

from __future__ import annotations

import json

from tempflow_core.config import load_config

from .conftest import tiny_overrides


def test_ablation_smoke_writes_figures_table_and_curves(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    from flows.ablation import VARIANTS, ablation_flow

    base = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=2) + ["eval.every=1"])
    out = tmp_path / "ablation"
    result = ablation_flow(base=base, variants=VARIANTS, seeds=[0], rewards=["brightness"], out=str(out))
    figs = result["brightness"]["figures"]
    for key in ("fig1", "fig4_left", "fig4_right", "fig2", "fig5", "table"):
        assert (out / "brightness").joinpath(figs[key].rsplit("/", 1)[-1]).stat().st_size > 0, key
    curves = json.loads((out / "brightness" / "curves.json").read_text())
    assert set(curves["curves"]) == set(VARIANTS)
    for points in curves["curves"].values():
        assert [p["iteration"] for p in points] == [1, 2]
    # branching spends more NFEs per iteration than plain SDE rollouts with these sizes
    nfe = {v: curves["curves"][v][-1]["nfe"] for v in VARIANTS}
    assert nfe["tempflow"] == nfe["branch"] > nfe["flow_grpo"] == nfe["flow_grpo_fixed"]
    assert sorted(curves["std_by_step"]) == ["0", "1", "2", "3"]
    table = (out / "brightness" / "table.md").read_text()
    assert table.count("\n") >= 6 and "base model" in table and "tempflow" in table
