"""A smoke run of the ablation flow: five variants, one seed, two iterations; figures, table,
verdicts, the reproduction bundle, the MLflow report run, and `tempflow compare` on top."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tempflow_core.config import load_config
from tempflow_core.algorithm.schedule import make_schedule

from .conftest import tiny_overrides


def test_ablation_smoke_writes_figures_table_bundle_and_mlflow_report(prefect_api, tiny_model_dir, tmp_path,
                                                                       quiet_env):
    from mlflow import MlflowClient

    from flows.ablation import VARIANTS, ablation_flow, variant_config

    base = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=2) + ["eval.every=1"])
    out = tmp_path / "ablation"
    result = ablation_flow(base=base, variants=VARIANTS, seeds=[0], rewards=["brightness"], out=str(out))
    folder = out / "brightness"
    figs = result["brightness"]["figures"]
    for key in ("fig1", "fig4_left", "fig4_right", "fig2", "fig5", "table", "summary", "curves"):
        assert folder.joinpath(figs[key].rsplit("/", 1)[-1]).stat().st_size > 0, key
    curves = json.loads((folder / "curves.json").read_text())
    assert set(curves["curves"]) == set(VARIANTS) and curves["seeds"] == [0]
    for points in curves["curves"].values():  # every curve starts at the same base model score
        assert [p["iteration"] for p in points] == [0, 1, 2]
        assert points[0]["score"] == curves["base_eval"]["reward"] and points[0]["nfe"] == 0
    # NFEs = transformer rows of rollout + learner, 2 iterations of B 2 prompts, K 3, T 4, KL on.
    # Branching: backbone steps 0..2 (3 rows) + each child's ODE from its branch step to the end
    # (K (3 + 2 + 1) = 18) per prompt; the learner one row per branch point (B x 3), twice
    # with the KL reference. Plain: K T = 12 rows per prompt; the learner one row per trained
    # step 0..2 of each of the B K trajectories, twice.
    nfe = {v: curves["curves"][v][-1]["nfe"] for v in VARIANTS}
    rollout_nfe = {v: curves["curves"][v][-1]["rollout_nfe"] for v in VARIANTS}
    assert rollout_nfe["tempflow"] == rollout_nfe["branch"] == 2 * 2 * (3 + 18)
    assert nfe["tempflow"] == nfe["branch"] == 2 * (2 * (3 + 18) + 2 * 2 * 3)
    for plain in ("flow_grpo", "flow_grpo_fixed", "reweight"):
        assert rollout_nfe[plain] == 2 * 2 * 12
        assert nfe[plain] == 2 * (2 * 12 + 2 * 2 * 3 * 3)
    assert sorted(curves["std_by_step"]) == ["0", "1", "2"]  # T = 4: branch points 0..T-2
    # Figure 4 draws the grid the rollouts were sampled on: SD3's static shift 3 and a = 0.7 here
    sd3 = make_schedule(4, 3.0, 0.7)
    assert curves["grid"]["noise_level"] == 0.7
    assert torch.allclose(torch.tensor(curves["grid"]["sigmas"], dtype=torch.float64), sd3.sigmas.double())
    assert set(curves["headline"]["finals"]) == set(VARIANTS)
    table = (folder / "table.md").read_text()
    assert table.count("\n") >= 6 and "base model" in table and "tempflow" in table
    assert "flow_grpo_fixed ends above flow_grpo" in (folder / "summary.md").read_text()

    # the bundle: each run's config file trains exactly that run again
    for variant in VARIANTS:
        again = load_config(folder / "configs" / f"{variant}-s0.yaml")
        assert again.digest() == variant_config(base, variant, "brightness", 0).digest()
    assert (folder / "prompts" / "colors.jsonl").read_text().count("\n") > 4

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(base.pipeline.experiment)
    reports = client.search_runs([exp.experiment_id], "tags.`tempflow.kind` = 'ablation'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert set(reports[0].data.metrics) >= {f"final/{v}" for v in VARIANTS}
    logged = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(reports[0].info.run_id, "ablation")}
    assert {"fig2_score_vs_iteration.png", "table.md", "summary.md", "curves.json"} <= logged

    # redrawing from the finished runs trains nothing and gives the same curves; a missing run is named
    before = json.loads((folder / "curves.json").read_text())
    ablation_flow(base=base, variants=VARIANTS, seeds=[0], rewards=["brightness"], out=str(out), report_only=True)
    assert json.loads((folder / "curves.json").read_text())["curves"] == before["curves"]
    with pytest.raises(ValueError, match="abl-brightness-flow_grpo-s1-.* has not finished"):
        ablation_flow(base=base, variants=VARIANTS, seeds=[1], rewards=["brightness"], out=str(out), report_only=True)
    assert not list((tmp_path / "store").glob("abl-brightness-*-s1-*"))

    # a user's run plotted over the reference curves
    run = curves["runs"]["tempflow"]["0"]
    env = {**os.environ, "TEMPFLOW_HOME": str(tmp_path / "home")}
    cmp = subprocess.run([sys.executable, "-m", "flows.cli", "compare", run, "--reference", str(folder / "curves.json"),
                          "--store", str(tmp_path / "store"), "--out", str(tmp_path / "cmp.png")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "reference tempflow at iteration 2" in cmp.stdout and (tmp_path / "cmp.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "compare", run, "--reference", str(folder / "table.md"),
                          "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "table.md" in bad.stderr
