"""The pretraining flow: the tiny SD3 base model on rendered shape scenes, tracked in MLflow.

    tempflow pretrain --out models/tiny-shapes-sd3 [--seed 0 --minutes 60 --set steps=3000]

One MLflow run (experiment ``tempflow-pretrain``, tag tempflow.kind=pretrain) per pretraining:
the config as params, the VAE, training and evaluation metrics per step, the model card as
artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.model_card import write_model_card
from tasks.tracking import RunTracker, resolve_tracking_uri
from tempflow_core.pretrain import PretrainConfig, pretrain

EXPERIMENT = "tempflow-pretrain"


@task(name="pretrain", cache_policy=NONE)
def pretrain_task(config: PretrainConfig, out: str, tracking_uri: str, progress: bool = False) -> dict[str, Any]:
    """Pretrain into out, write its model card, and record both in one MLflow run."""
    tracker = RunTracker(tracking_uri, EXPERIMENT, run_name=f"pretrain-{Path(out).name}",
                         params=config.model_dump(mode="json"), tags={"tempflow.out": out}, kind="pretrain")
    log = get_run_logger()

    def on_metrics(step: int, metrics: dict[str, Any]) -> None:
        tracker.log_run_metrics(metrics, step)  # numbers only; non-finite values skipped
        if "overall" in metrics:
            log.info("step %d: overall strict %.3f", step, metrics["overall"])

    status = "FAILED"
    try:
        res = pretrain(config, out, progress=progress, log=on_metrics)
        write_model_card(res, config)
        for f in sorted(Path(out).glob("*.md")):
            tracker.log_artifact(None, f)
        status = "FINISHED"
        return {"out": str(res.out_dir), "steps": res.steps, "overall": res.final["overall"],
                "per_category": res.final["per_category"], "in_band": res.in_band, "stop_reason": res.stop_reason,
                "wall_min": round(res.wall_s / 60, 2), "size_mb": round(res.size_mb, 2), "mlflow_run_id": tracker.run_id}
    finally:
        tracker.finish(status)


@flow(name="tempflow-pretrain", validate_parameters=True)
def pretrain_flow(config: PretrainConfig = PretrainConfig(), out: str = "models/tiny-shapes-sd3",
                  tracking_uri: Optional[str] = None, run_root: str = "runs", progress: bool = False) -> dict[str, Any]:
    """Render scenes, train the VAE, then the transformer and text encoders; stop inside the band.

    Args:
        config: the pretraining settings.
        out: the model folder to write.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in run_root).
        run_root: folder of the default sqlite store (like the train flow's output_dir).
        progress: progress bars and phase lines on stderr.
    """
    # resolved here, once: a relative sqlite path or folder would follow each worker's cwd
    uri = resolve_tracking_uri(tracking_uri, Path(run_root))
    return pretrain_task(config, str(Path(out).resolve()), uri, progress)
