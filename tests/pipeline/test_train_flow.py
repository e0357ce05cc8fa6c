"""The training flow through the real Prefect engine, MLflow and the object store."""

from __future__ import annotations

import json

import pytest
import safetensors.torch as st
import torch

from tempflow_core.config import load_config
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.train import train_in_process

from .conftest import KEY_ID, SECRET, tiny_overrides

FAIL = {"on": False}


def _flaky():
    def fn(images, prompts, metadata):
        if FAIL["on"]:
            raise RuntimeError("reward server down (test)")
        return images.reshape(len(images), -1).mean(1) / 255.0, {}

    return fn


def _constant():
    def fn(images, prompts, metadata):
        import numpy as np

        return np.zeros(len(images), dtype=np.float32), {}

    return fn


# this module as a reward plugin (reward.plugins=[<its name>]): the test rewards join the built-in ones
REWARDS = {"test_flaky_brightness": _flaky, "test_constant": _constant}


def _lora(path_or_bytes) -> dict[str, torch.Tensor]:
    raw = st.load(path_or_bytes) if isinstance(path_or_bytes, bytes) else st.load_file(str(path_or_bytes))
    return {k.removeprefix("transformer."): v for k, v in raw.items()}


def _final_adapter(cfg, run_id: str) -> dict[str, torch.Tensor]:
    from tempflow_core.algorithm.checkpoint import adapter_bytes

    lay = RunLayout.open(cfg, run_id)
    return _lora(adapter_bytes(lay.store, lay.prefix(cfg.train.iterations - 1, "learner")))


def test_two_iterations_on_s3_match_in_process_and_are_visible_in_prefect_and_mlflow(
        prefect_api, s3_server, mlflow_server, tiny_model_dir, tmp_path, quiet_env):
    from flows.train import train_flow

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir) + [
        "pipeline.store=s3://tempflow-test/runs", f"pipeline.s3_endpoint_url={s3_server}",
        f"pipeline.mlflow_uri={mlflow_server}"])
    result = train_flow(config=cfg, run_id="e2e")
    assert result["run_id"] == "e2e" and result["checkpoint"].startswith("s3://tempflow-test/runs/e2e/")

    # the orchestrated run ends with the very LoRA the in-process loop gives
    ref = train_in_process(cfg, tmp_path / "inproc")
    got, want = _final_adapter(cfg, "e2e"), _lora(ref.lora_path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    # what a user sees in Prefect: the flow run, its stage runs and artifacts
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as c:
            runs = await c.read_flow_runs()
            run = [r for r in runs if r.parameters.get("run_id") == "e2e"][0]
            tasks = [t for t in await c.read_task_runs() if t.flow_run_id == run.id]
            arts = await c.read_artifacts()
            return run, tasks, [a.key for a in arts if a.flow_run_id == run.id]

    run, tasks, keys = asyncio.run(read())
    names = sorted(t.name for t in tasks)
    assert run.state.is_completed()
    for stage in ("init", "rollout-iter-0", "reward-iter-1", "learner-iter-1", "eval-iter-1", "track-iter-0",
                  "base-eval"):
        assert stage in names
    # the iteration's graph in the UI: each stage's task run takes the URIs of the ones before as inputs
    by_id, by_name = {t.id: t.name for t in tasks}, {t.name: t for t in tasks}

    def upstream(name: str, parameter: str) -> list[str]:
        return [by_id.get(i.id) for i in by_name[name].task_inputs.get(parameter, []) if hasattr(i, "id")]

    assert upstream("reward-iter-1", "rollouts") == ["rollout-iter-1"]
    assert upstream("learner-iter-1", "rollouts") == ["rollout-iter-1"]
    assert upstream("learner-iter-1", "rewards") == ["reward-iter-1"]
    assert {"tempflow-metrics", "tempflow-summary"} <= set(keys)

    # MLflow, through the REST API of a tracking server on 127.0.0.1: the parent run, one
    # child per iteration, metrics per iteration, the LoRA models and their dataset inputs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["algorithm"] == "tempflow"
    assert not any(SECRET in str(v) or KEY_ID in str(v) for v in parent.data.params.values())
    hist = client.get_metric_history(parent.info.run_id, "reward/mean")
    assert sorted(m.step for m in hist) == [0, 1]
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 2
    assert all(k.inputs.dataset_inputs for k in kids)
    assert all(k.data.metrics.get("reward/mean") is not None for k in kids)
    models = client.search_logged_models([parent.info.experiment_id])
    assert len(models) == 2
    assert {m.tags.get("tempflow.parent_model_id") for m in models} == {"base", *[m.model_id for m in models]} - {
        max(models, key=lambda m: int(m.tags["tempflow.iteration"])).model_id}
    dst = tmp_path / "downloaded"
    import mlflow.artifacts

    mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location, dst_path=str(dst),
                                        tracking_uri=mlflow_server)
    assert list(dst.rglob("pytorch_lora_weights.safetensors"))


def test_failed_stage_resumes_without_redoing_finished_stages(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    from flows.train import train_flow

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir)
                      + ["reward.name=test_flaky_brightness", f"reward.plugins=[{__name__}]"])
    lay = RunLayout.open(cfg, "flaky")
    FAIL["on"] = True
    with pytest.raises(Exception, match="reward server down"):
        train_flow(config=cfg, run_id="flaky")
    assert lay.complete(0, "rollout") and not lay.complete(0, "reward")
    rollout_manifest = lay.store.get_bytes("flaky/iter-000000/rollout/manifest.json")
    FAIL["on"] = False
    train_flow(config=cfg, run_id="flaky")
    assert lay.store.get_bytes("flaky/iter-000000/rollout/manifest.json") == rollout_manifest  # not redone
    ref = train_in_process(cfg, tmp_path / "inproc")
    got, want = _final_adapter(cfg, "flaky"), _lora(ref.lora_path)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_rerun_from_reward_reuses_rollouts_with_another_reward(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    from flows.train import train_flow
    from tempflow_core.run.runs import read_run

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=1))
    train_flow(config=cfg, run_id="base")
    cfg2 = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=1)
                       + ["reward.name=jpeg_compressibility"])
    train_flow(config=cfg2, run_id="rescored", resume_from="base", from_stage="reward")
    lay = RunLayout.open(cfg, "base")
    shard = "iter-000000/rollout/manifest.json"
    assert lay.store.get_bytes(f"rescored/{shard}") == lay.store.get_bytes(f"base/{shard}")
    r1 = json.loads(lay.store.get_bytes("base/iter-000000/reward/manifest.json"))
    r2 = json.loads(lay.store.get_bytes("rescored/iter-000000/reward/manifest.json"))
    assert r1["objects"] != r2["objects"]  # re-scored
    assert read_run(RunLayout(lay.store, "rescored"))["resumed_from"] == {"run": "base", "stage": "reward",
                                                                          "iteration": 0}
    # the same branch again (Prefect's Retry of that flow run) continues the run; nothing is redone
    final = lay.store.get_bytes("rescored/iter-000000/learner/manifest.json")
    train_flow(config=cfg2, run_id="rescored", resume_from="base", from_stage="reward")
    assert lay.store.get_bytes("rescored/iter-000000/learner/manifest.json") == final
    # a branch whose changed setting reaches a reused output is refused, and writes nothing
    from tempflow_core.run.runs import RunError

    cfg7 = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=1)
                       + ["sampling.guidance_scale=7"])
    with pytest.raises(RunError, match="would reuse rollout outputs .*sampling.guidance_scale"):
        train_flow(config=cfg7, run_id="cfg7", resume_from="base", from_stage="learner")
    assert lay.store.list("cfg7") == []


def test_a_run_held_by_a_live_process_is_refused_before_any_work(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    import socket
    import subprocess
    import sys

    from flows.train import train_flow
    from tempflow_core.run.runlock import RunLocked

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=1))
    lay = RunLayout.open(cfg, "busy")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lay.store.put_bytes("busy/lock.json", json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                          "token": "x", "since": "now"}).encode())
        with pytest.raises(RunLocked, match=f"run 'busy' is being written by pid {other.pid}"):
            train_flow(config=cfg, run_id="busy")
        assert lay.store.list("busy") == ["busy/lock.json"]
    finally:
        other.kill()
        other.wait()


def test_degenerate_reward_stops_the_run_naming_it(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    from flows.train import train_flow
    from tempflow_core.algorithm.controller import DegenerateRewardError

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=5)
                      + ["reward.name=test_constant", f"reward.plugins=[{__name__}]",
                                                                          "guard.max_bad_iterations=2"])
    with pytest.raises(DegenerateRewardError, match="test_constant"):
        train_flow(config=cfg, run_id="flat")
    lay = RunLayout.open(cfg, "flat")
    assert lay.complete(2, "learner") and not lay.complete(3, "rollout")  # stopped after 3 bad iterations


def test_ema_is_checkpointed_and_matches_in_process(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    from flows.train import train_flow
    from tempflow_core.algorithm.checkpoint import load_checkpoint

    # Flow-GRPO's EMA: after optimizer step n (here one per iteration) the decay is
    # min((1 + n) / (10 + n), 0.5), and the EMA takes the weights when (n + 1) % 2 == 0
    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=3)
                      + ["train.ema_decay=0.5", "train.ema_update_interval=2", "train.minibatches=1", "train.lr=0.05"])
    train_flow(config=cfg, run_id="ema")
    lay = RunLayout.open(cfg, "ema")
    ck0, ck1, ck2 = (load_checkpoint(lay.store, lay.prefix(i, "learner")) for i in (0, 1, 2))
    init = load_checkpoint(lay.store, lay.prefix(-1, "learner")).lora
    for k in ck1.lora:
        torch.testing.assert_close(ck0.ema[k], 2 / 11 * init[k].float() + 9 / 11 * ck0.lora[k].float())  # n = 1
        assert torch.equal(ck1.ema[k], ck0.ema[k])  # n = 2: not an update step
        torch.testing.assert_close(ck2.ema[k], 4 / 13 * ck1.ema[k] + 9 / 13 * ck2.lora[k].float())  # n = 3
    assert any(not torch.equal(ck2.ema[k], ck2.lora[k]) for k in ck2.lora)
    ref = train_in_process(cfg, tmp_path / "inproc")
    want = _lora(ref.lora_path.parent.parent / "lora_ema" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(ck2.ema[k], want[k]) for k in want)


def test_a_run_resumed_on_another_tracking_server_is_logged_there_in_full(prefect_api, tiny_model_dir, tmp_path,
                                                                          quiet_env):
    """The store remembers the MLflow run of the server the run was tracked on; resumed against
    another server (another TEMPFLOW_HOME, a shared store), that run is not there: a new MLflow
    run takes the run, with every finished iteration re-logged, instead of a failed flow."""
    from mlflow import MlflowClient

    from flows.train import train_flow

    overrides = tiny_overrides(tmp_path, tiny_model_dir) + ["eval.every=1"]
    uris = [f"sqlite:///{tmp_path / name}.db" for name in ("first", "second")]
    cfgs = [load_config(overrides=overrides + [f"pipeline.mlflow_uri={uri}"]) for uri in uris]
    first = train_flow(config=cfgs[0], run_id="moved")
    second = train_flow(config=cfgs[1], run_id="moved")  # finished on the store: only tracking is redone
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert json.loads(RunLayout.open(cfgs[1], "moved").store.get_bytes("moved/run.json"))["mlflow_run_id"] == \
        second["mlflow_run_id"]
    old, new = MlflowClient(uris[0]), MlflowClient(uris[1])
    run = new.get_run(second["mlflow_run_id"])
    assert run.data.tags["tempflow.mlflow_run_elsewhere"] == first["mlflow_run_id"]
    kids = new.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(int(k.data.tags["tempflow.iteration"]) for k in kids) == [0, 1]
    # the same metrics, step for step, as the first server recorded while the run trained
    logged = old.get_run(first["mlflow_run_id"]).data.metrics
    assert logged and set(run.data.metrics) == set(logged)
    for key in logged:
        want = [(m.step, m.value) for m in old.get_metric_history(first["mlflow_run_id"], key)]
        got = [(m.step, m.value) for m in new.get_metric_history(run.info.run_id, key)]
        assert sorted(got) == sorted(want), key
