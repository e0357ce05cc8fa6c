"""Prefect tasks that record a run in MLflow from what the stages wrote to the store.

Tracking reads only the store (manifests, checkpoints, eval results), so it can be retried
or replayed after a crash; `{run}/iter-i/mlflow.json` records what was logged, so a resumed
run never logs an iteration twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from tasks.tracking import RunTracker, resolve_tracking_uri
from tempflow_core.run import stages
from tempflow_core.algorithm.checkpoint import ADAPTER
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.reports.report import eval_score
from tempflow_core.run.runs import config_yaml, display_name
from tempflow_core.shards import manifest_key, read_rollouts, read_scores
from tempflow_core.storage import ObjectNotFound, join_key

CONFIG_ARTIFACT = "config.yaml"


def run_root(config: RunConfig) -> Path:
    """Local folder for run-side files (MLflow's sqlite by default)."""
    root = Path(config.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def tracker_for(config: RunConfig, lay: RunLayout, record: dict[str, Any]) -> RunTracker:
    origin = record.get("resumed_from") or {}
    return RunTracker(
        resolve_tracking_uri(config.pipeline.mlflow_uri, run_root(config)), config.pipeline.experiment,
        run_name=display_name(config, lay.run_id), params=config.model_dump(mode="json"),  # secret keys dropped
        tags={"tempflow.run_id": lay.run_id, "tempflow.store": lay.store.uri_for(lay.run_id),
              "tempflow.algorithm": config.algorithm, "tempflow.config_digest": config.digest()},
        run_id=record.get("mlflow_run_id"), parent_run_id=origin.get("run"),
    )


def describe_run(config: RunConfig, lay: RunLayout, tracker: RunTracker) -> None:
    """What a person reads first on the MLflow run's page: what ran and the command that runs it
    again, with the run's whole config as the artifact `config.yaml` (credentials masked)."""
    tracker.log_text(config_yaml(config), CONFIG_ARTIFACT)
    uri = f"MLFLOW_TRACKING_URI={shlex.quote(tracker.tracking_uri)} "
    tracker.describe(
        f"**{config.algorithm}** on reward **{config.reward.name}**, seed {config.train.seed}, "
        f"{config.train.iterations} iterations of {config.rollout.prompts_per_iter} prompts x "
        f"{config.rollout.group_size}, model `{config.model.path or 'tiny (random init)'}`; "
        f"stages and checkpoints in `{lay.store.uri_for(lay.run_id)}`.\n\n"
        f"Reproduce (a new run with this config; `{CONFIG_ARTIFACT}` is in this run's artifacts):\n\n"
        f"    {uri}mlflow artifacts download --run-id {tracker.run_id} --artifact-path {CONFIG_ARTIFACT} --dst-path .\n"
        f"    tempflow train --config {CONFIG_ARTIFACT}\n")


def _marker_key(lay: RunLayout, iteration: int) -> str:
    return lay.tracked_key(iteration)


def _read_marker(lay: RunLayout, iteration: int, tracker: RunTracker) -> dict[str, Any] | None:
    """What iteration i logged to MLflow, if it logged it to the tracker's run (a marker
    written for a run on another tracking server does not count: resumed there, it re-logs)."""
    try:
        marker = json.loads(lay.store.get_bytes(_marker_key(lay, iteration)))
    except ObjectNotFound:
        return None
    return marker if _logged_here(marker, tracker) else None


def _logged_here(marker: dict[str, Any], tracker: RunTracker) -> bool:
    return marker.get("mlflow_run_id", tracker.run_id) == tracker.run_id  # markers before the field: this run


def group_grid_png(lay: RunLayout, iteration: int, max_groups: int = 4) -> bytes:
    """The K children of a few branch points (or one prompt's G samples), labelled with rewards."""
    from tempflow_core.shapes import image_grid

    batch = read_rollouts(lay.store, lay.prefix(iteration, "rollout"), images=True, verify=False)
    rewards = read_scores(lay.store, lay.iteration_prefix(iteration), "reward").aligned(batch.sample_keys(), "reward")
    groups = batch.group_ids()
    chosen = list(dict.fromkeys(groups))
    chosen = chosen[:: max(1, len(chosen) // max_groups)][:max_groups]
    idx = [i for i, g in enumerate(groups) if g in chosen]
    labels = [f"{groups[i][-8:]} {rewards[i]:.2f}" for i in idx]
    ncols = max(1, sum(1 for g in groups if g == chosen[0]))
    images = batch.images()
    if images.shape[2] > images.shape[1]:  # clips as frame strips: one a row, two of each group
        keep = [j for j, i in enumerate(idx) if sum(1 for i2 in idx[:j] if groups[i2] == groups[i]) < 2]
        idx, labels, ncols = [idx[j] for j in keep], [labels[j] for j in keep], 1
    buf = io.BytesIO()
    image_grid(images[idx], ncols=ncols, labels=labels).save(buf, format="PNG")
    return buf.getvalue()


@task(name="track-iteration", task_run_name="track-iter-{iteration}", cache_policy=NONE, retries=2,
      retry_delay_seconds=5)
def track_iteration(config: RunConfig, lay: RunLayout, iteration: int, tracker: RunTracker) -> str:
    """Metrics, the rollout shard set as a dataset input, the checkpoint as a logged model."""
    done = _read_marker(lay, iteration, tracker)
    if done is not None:
        return done["model_id"]
    prev = _read_marker(lay, iteration - 1, tracker) if iteration > 0 else None
    metrics = stages.checkpoint_metrics(lay, iteration)
    tracker.start_iteration(iteration)
    tracker.log_metrics(iteration, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    rp = lay.prefix(iteration, "rollout")
    manifest = lay.store.get_bytes(manifest_key(rp))
    tracker.log_rollout_dataset(iteration, lay.store.uri_for(rp), hashlib.sha256(manifest).hexdigest()[:16],
                                int(json.loads(manifest).get("num_keys", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        ck = lay.prefix(iteration, "learner")
        (Path(tmp) / "pytorch_lora_weights.safetensors").write_bytes(lay.store.get_bytes(join_key(ck, ADAPTER)))
        if config.pipeline.grid_every and iteration % config.pipeline.grid_every == 0:
            png = Path(tmp) / "groups.png"
            png.write_bytes(group_grid_png(lay, iteration))
            tracker.log_image(iteration, "group_grid", png)
        model_id = tracker.log_checkpoint(iteration, Path(tmp), lay.store.uri_for(ck), lay.store.uri_for(rp),
                                          prev["model_id"] if prev else None, metrics=None)
    tracker.end_iteration()
    lay.store.put_bytes(_marker_key(lay, iteration),
                        json.dumps({"model_id": model_id, "mlflow_run_id": tracker.run_id}).encode())
    return model_id


def score_key(config: RunConfig) -> str:
    """What a held-out score measures, so that only comparable checkpoints compete for the
    alias 'best': the experiment, the base model, the objective and the evaluation protocol."""
    from tempflow_core.run.preflight import eval_prompt_source

    what = {"experiment": config.pipeline.experiment, "model": config.model.path, "resolution": config.model.resolution,
            "reward": config.reward.name, "weights": config.reward.weights, "eval_prompts": eval_prompt_source(config)[1],
            "eval": config.eval.model_dump(mode="json", exclude={"every", "extra_reward"}),
            "eval_num_steps": config.sampling.eval_num_steps, "guidance_scale": config.guidance_scale()}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{config.pipeline.experiment}/{config.reward.name}/{digest}"


@task(name="track-eval", task_run_name="track-eval-{iteration}", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def track_eval(config: RunConfig, lay: RunLayout, iteration: int, tracker: RunTracker, result: dict[str, Any]) -> None:
    """Eval scores, table and grid; the best checkpoint by held-out score gets the alias 'best'."""
    eval_marker = lay.tracked_key(iteration, evaluation=True)
    try:  # logged before a resume, to this MLflow run: never twice
        if _logged_here(json.loads(lay.store.get_bytes(eval_marker)), tracker):
            return
    except ObjectNotFound:
        pass
    scores = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
    scores.update({f"geneval/{k}": float(v) for k, v in result.get("geneval", {}).items()})
    table = None
    if "geneval" in result:
        from tempflow_core.shapes import format_table

        table = format_table({f"iter {iteration}": {"overall": result["geneval_overall"], "per_category": result["geneval"]}})
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "eval_grid.png"
        grid.write_bytes(lay.store.get_bytes(join_key(lay.prefix(iteration, "eval"), "grid.png")))
        tracker.log_eval(iteration, scores, table, grid)
    marker = _read_marker(lay, iteration, tracker)
    score = eval_score(config.reward.name, result)  # what the run trains, never another objective
    best_key = lay.best_key
    try:
        best = json.loads(lay.store.get_bytes(best_key))
    except ObjectNotFound:
        best = None
    if best is not None and not _logged_here(best, tracker):  # registered on another tracking server
        best = None
    if marker is not None and (best is None or score > best["score"]):  # this run's best: a new version
        version = tracker.register(marker["model_id"], config.pipeline.registered_model)
        # the alias moves only when this checkpoint beats the alias's holder on the same score
        promoted = tracker.promote(config.pipeline.registered_model, "best", version, score, score_key(config))
        lay.store.put_bytes(best_key, json.dumps({"iteration": iteration, "score": float(np.float64(score)),
                                                  "model_id": marker["model_id"], "version": version,
                                                  "alias_best": promoted, "mlflow_run_id": tracker.run_id}).encode())
    lay.store.put_bytes(eval_marker, json.dumps({"mlflow_run_id": tracker.run_id}).encode())


@task(name="track-ablation", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def track_ablation(config: RunConfig, name: str, files: dict[str, str], headline: dict[str, Any]) -> str:
    """One MLflow run (tempflow.kind=ablation) per ablation and reward: the figures, table,
    verdicts and curves as artifacts, each variant's final score as a metric."""
    tracker = RunTracker(resolve_tracking_uri(config.pipeline.mlflow_uri, run_root(config)),
                         config.pipeline.experiment, run_name=name, params=config.model_dump(mode="json"),
                         tags={"tempflow.ablation": name}, kind="ablation")
    try:
        for path in files.values():
            tracker.log_artifact(None, Path(path), "ablation")
        metrics = {}
        for variant, final in headline.get("finals", {}).items():
            metrics[f"final/{variant}"] = final["mean"]
            metrics[f"final_std/{variant}"] = final["std"]
        tracker.log_run_metrics(metrics)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id
