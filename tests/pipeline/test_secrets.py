"""Planted secrets never leave the process: a short `tempflow train` with a password in the
MLflow URI, a reward server's token in the reward's URL and AWS credentials in the environment,
then every place the run wrote is searched
for them (files under the test's folders and TEMPFLOW_HOME, every object of the run on S3,
every line the CLI printed, the MLflow server's database, artifacts and log, every MLflow
param and tag, the Prefect flow run's parameters and logs, and the Prefect server's database
file with every table)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import boto3

from moto_s3 import KEY_ID, SECRET as AWS_SECRET

from .conftest import tiny_overrides

PASSWORD = "pw-planted-7f3e9c41"
REWARD_TOKEN = "rt-planted-91c2aa07"
PLANTED = {"MLflow URI password": PASSWORD, "AWS secret access key": AWS_SECRET, "AWS access key id": KEY_ID,
           "reward server token": REWARD_TOKEN}


def _found(text: bytes | str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, value in PLANTED.items() if value.encode() in data]


def test_planted_secrets_are_found_nowhere(prefect_api, mlflow_server, s3_server, tiny_model_dir, tmp_path,
                                           tmp_path_factory):
    import threading

    from tempflow_core.rewards.server import RewardServer

    rewards = RewardServer("brightness", token=REWARD_TOKEN)  # on 127.0.0.1, in a thread of this process
    threading.Thread(target=rewards.serve_forever, daemon=True).start()
    host = mlflow_server.removeprefix("http://")
    sets = tiny_overrides(tmp_path, tiny_model_dir, iterations=1) + [
        "pipeline.store=s3://tempflow-test/secrets", f"pipeline.s3_endpoint_url={s3_server}",
        f"pipeline.mlflow_uri=http://tempflow:{PASSWORD}@{host}", "pipeline.experiment=tempflow-secrets",
        "reward.name=remote", f"reward.options.remote.url=http://{REWARD_TOKEN}@{rewards.url.removeprefix('http://')}",
    ]
    env = {**os.environ, "TEMPFLOW_HOME": str(tmp_path / "home"), "PREFECT_API_URL": prefect_api,
           "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("TEMPFLOW_REWARD_TOKEN", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_HOME", None)  # CI sets one; the run's Prefect state must land under TEMPFLOW_HOME to be searched
    try:
        out = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--run-id", "secrets"]
                             + sum((["--set", s] for s in sets), []), capture_output=True, text=True, timeout=600,
                             env=env, cwd=tmp_path)
    finally:
        rewards.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run secrets finished" in out.stdout
    leaks: dict[str, list[str]] = {}

    def check(where: str, data: bytes | str) -> None:
        if _found(data):
            leaks[where] = _found(data)

    # 1. every line the CLI printed (Prefect's and MLflow's log lines included)
    check("stdout", out.stdout)
    check("stderr", out.stderr)
    # 2. every file the run wrote locally (run folder, TEMPFLOW_HOME with Prefect's state)
    assert (tmp_path / "home" / "prefect").is_dir()
    for p in (p for p in tmp_path.rglob("*") if p.is_file()):
        check(str(p), p.read_bytes())
    # 3. every object of the run on S3 (run.json, manifests, shards, checkpoints)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tempflow-test", Prefix="secrets/")["Contents"]]
    assert "secrets/secrets/run.json" in keys or any(k.endswith("run.json") for k in keys)
    for k in keys:
        check(f"s3://tempflow-test/{k}", s3.get_object(Bucket="tempflow-test", Key=k)["Body"].read())
    # 4. the MLflow server's own files: database, proxied artifacts, its log
    server_files = [p for d in tmp_path_factory.getbasetemp().glob("mlflow-server*") for p in d.rglob("*") if p.is_file()]
    assert server_files
    for p in server_files:
        check(str(p), p.read_bytes())
    # 5. every MLflow param and tag of the run's runs and models, through the REST API
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tempflow-secrets")
    runs = client.search_runs([exp.experiment_id])
    assert runs
    params = [f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()]
    assert any(p.startswith("pipeline.mlflow_uri=") for p in params)
    for lm in client.search_logged_models([exp.experiment_id]):
        params += [f"{k}={v}" for k, v in {**lm.params, **lm.tags}.items()]
    check("MLflow params and tags", "\n".join(params))
    # 6. the Prefect flow run: its parameters and its log lines on the server
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    async def prefect_records() -> tuple[str, int]:
        async with get_client() as c:
            runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["tempflow-train"])))
            mine = [r for r in runs if "secrets" in str(r.parameters.get("run_id"))]
            assert mine
            logs = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in mine])))
            return "\n".join([str(r.parameters) for r in mine] + [lg.message for lg in logs]), len(logs)

    text, n_logs = asyncio.run(prefect_records())
    assert n_logs > 0
    check("Prefect flow run parameters and logs", text)
    # 7. the Prefect server's database itself (every table: parameters, states, logs, artifacts)
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = url.split(":///", 1)[1]
    db_files = [p for p in (db, db + "-wal") if os.path.isfile(p)]
    assert db_files and os.path.getsize(db) > 0
    for p in db_files:
        with open(p, "rb") as f:
            check(p, f.read())
    assert leaks == {}, leaks
