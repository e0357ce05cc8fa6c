"""The pretraining flow: the tiny SD3 base model on rendered shape scenes, tracked in MLflow.

    tempflow pretrain --out models/tiny-shapes-sd3 [--set steps=3000 --set max_minutes=60]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from tempflow_core.pretrain import PretrainConfig, pretrain


@task(name="pretrain", cache_policy=NONE)
def pretrain_task(config: PretrainConfig, out: str, tracking_uri: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from tasks.tracking import flatten_params

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tempflow-pretrain")
    exp_id = exp.experiment_id if exp else client.create_experiment("tempflow-pretrain")
    run = client.create_run(exp_id, run_name=f"pretrain-{Path(out).name}", tags={"tempflow.out": out})
    for k, v in flatten_params(config.model_dump(mode="json")).items():
        client.log_param(run.info.run_id, k, v)
    log = get_run_logger()

    def on_metrics(step: int, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                client.log_metric(run.info.run_id, k.replace(":", "_"), float(v), step=step)
        if "overall" in metrics:
            log.info("step %d: overall strict %.3f", step, metrics["overall"])

    status = "FAILED"
    try:
        res = pretrain(config, out, progress=False, log=on_metrics)
        for f in Path(out).glob("*.md"):
            client.log_artifact(run.info.run_id, str(f))
        status = "FINISHED"
        return {"out": str(res.out_dir), "steps": res.steps, "overall": res.final["overall"],
                "per_category": res.final["per_category"], "in_band": res.in_band, "mlflow_run_id": run.info.run_id}
    finally:
        client.set_terminated(run.info.run_id, status)


@flow(name="tempflow-pretrain", validate_parameters=True)
def pretrain_flow(config: PretrainConfig = PretrainConfig(), out: str = "models/tiny-shapes-sd3",
                  tracking_uri: str = "sqlite:///.tempflow/runs/mlflow.db") -> dict[str, Any]:
    """Render scenes, train the VAE, then the transformer and text encoders; stop inside the band."""
    return pretrain_task(config, out, tracking_uri)
