"""`tempflow pretrain` as a Prefect flow with an MLflow run (a tiny budget)."""

from __future__ import annotations


def test_pretrain_flow_writes_a_model_and_tracks_it(prefect_api, tmp_path, quiet_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.pretrain import pretrain_flow
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.pretrain import PretrainConfig

    cfg = PretrainConfig(
        model=TinyModelConfig(resolution=32), images=120, val_images=16, vae_steps=2, vae_batch=8, vae_crop=16,
        encode_batch=60, steps=6, batch=8, warmup=1, eval_every=3, eval_per_prompt=1, eval_steps=2,
        final_per_prompt=1, final_train_per_prompt=0, band=(0.0, 1.0), stop_at=2.0)
    # relative paths: the flow resolves them once, against the cwd it starts in
    monkeypatch.chdir(tmp_path)
    result = pretrain_flow(config=cfg, out="model", run_root="runs")
    assert result["steps"] == 6 and result["stop_reason"] == "step budget" and result["in_band"] is True
    assert result["out"] == str(tmp_path / "model")
    out = tmp_path / "model"
    assert load_pipeline(out).transformer is not None
    for name in ("MODEL_CARD.md", "README.md"):
        assert (out / name).is_file(), name
    assert "| Model | Overall |" in (out / "MODEL_CARD.md").read_text()

    # the default store: sqlite in run_root with the artifacts next to it, nothing in the cwd
    assert (tmp_path / "runs" / "mlflow.db").is_file() and (tmp_path / "runs" / "mlartifacts").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "runs"]
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "6"
    assert run.data.tags["tempflow.kind"] == "pretrain"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "overall")) == [3, 6]  # eval_every 3
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["MODEL_CARD.md", "README.md"]
