"""`tempflow pretrain` as a Prefect flow with an MLflow run (a tiny budget)."""

from __future__ import annotations


def test_pretrain_flow_writes_a_model_and_tracks_it(prefect_api, tmp_path, quiet_env):
    from mlflow.tracking import MlflowClient

    from flows.pretrain import pretrain_flow
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.models import load_pipeline
    from tempflow_core.pretrain import PretrainConfig

    cfg = PretrainConfig(
        model=TinyModelConfig(resolution=32), images=120, val_images=16, vae_steps=2, vae_batch=8, vae_crop=16,
        encode_batch=60, steps=6, batch=8, warmup=1, eval_every=3, eval_per_prompt=1, eval_steps=2,
        final_per_prompt=1, final_train_per_prompt=0, band=(0.0, 1.0), stop_at=2.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = pretrain_flow(config=cfg, out=str(tmp_path / "model"), tracking_uri=uri)
    assert result["steps"] == 6 and 0.0 <= result["overall"] <= 1.0
    assert load_pipeline(tmp_path / "model").transformer is not None
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "6"
    assert MlflowClient(uri).get_metric_history(run.info.run_id, "overall")
