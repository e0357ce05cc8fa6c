"""tasks/tracking/ against real MLflow 3: a local sqlite store and a real `mlflow server`
on 127.0.0.1 (read back through the REST client). No mocks."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import pickle
import socketserver
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from tasks.tracking import (
    RunTracker,
    TrackingUnavailable,
    flatten_params,
    is_secret_key,
    resolve_tracking_uri,
)

from .mlflow_server import mlflow_server  # noqa: F401  (session fixture)

SECRET = "SUPERSECRET-abc123"
PARAMS = {
    "train": {"lr": 1e-4, "iterations": 2, "variant": "tempflow", "k_children": 6},
    "model": {"path": "/models/tiny-sd3", "tokenizer": "clip", "lora(r)": 4},
    "storage": {"uri": "s3://runs", "aws_secret_access_key": SECRET, "AccessKeyId": SECRET,
                "endpoint": f"http://minio:{SECRET}@127.0.0.1:9000"},
    "hf_token": SECRET,
    "db": {"password": SECRET},
}
REGISTERED = "tempflow-test-lora"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()  # 64 chars: longer than MLflow's 36


def _write_adapter(root: pathlib.Path, it: int) -> pathlib.Path:
    from safetensors.numpy import save_file

    d = root / f"lora-{it:06d}"
    d.mkdir(parents=True)
    save_file({"lora_A.weight": np.full((4, 8), it, np.float32)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (d / "aws_credentials").write_text(SECRET)  # must not be uploaded
    return d


def _png(path: pathlib.Path, value: int) -> pathlib.Path:
    Image.fromarray(np.full((8, 16, 3), value, np.uint8)).save(path)
    return path


def run_two_iterations(tracker: RunTracker, tmp: pathlib.Path) -> dict:
    """What flows/train.py does for two iterations; returns ids for the checks."""
    tracker.log_prompts_dataset("shapes-prompts", (tmp / "prompts.jsonl").as_uri(), _sha("prompts-v1"))
    parent_model = None
    models, children = [], []
    for it in (0, 1):
        tracker.start_iteration(it)
        tracker.log_metrics(it, {"reward_mean": 0.5 + it, "loss": 1.0 / (it + 1),
                                 "kl": float("nan"), "clip_frac": float("inf"), "weight/step 3": 1.0})
        manifest = f"s3://runs/r1/iter-{it:06d}/rollouts/manifest.json"
        tracker.log_rollout_dataset(it, manifest, _sha(manifest), num_samples=12)
        mid = tracker.log_checkpoint(
            it, _write_adapter(tmp, it), checkpoint_uri=f"s3://runs/r1/iter-{it:06d}/checkpoint/",
            rollout_manifest_uri=manifest, parent_model_id=parent_model, metrics={"loss": 1.0 / (it + 1)})
        tracker.log_eval(it, {"geometry": 0.25 * (it + 1)},
                         table_markdown="| prompt | score |\n|---|---|\n| a red circle | 0.5 |\n",
                         grid_png=_png(tmp / f"grid-{it}.png", 40 * it))
        children.append(tracker.iteration_run_id(it))
        models.append(mid)
        parent_model = mid
        tracker.end_iteration()
    version = tracker.register(models[-1], REGISTERED, alias="best")
    tracker.finish()
    return {"models": models, "children": children, "version": version}


def check_readback(uri: str, tracker: RunTracker, res: dict, tmp: pathlib.Path) -> None:
    """Everything the pipeline logged, read through a fresh client on ``uri``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FINISHED"
    # the UI opens the experiment on its training runs (its kind), not on the GenAI overview
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == "train-test"

    # no secret anywhere in params or tags; URL passwords masked
    blob = json.dumps([parent.data.params, parent.data.tags])
    assert SECRET not in blob
    assert parent.data.params["train.lr"] == "0.0001"
    assert parent.data.params["model.tokenizer"] == "clip"
    assert parent.data.params["model.lora_r_"] == "4"  # invalid key characters replaced
    assert "storage.aws_secret_access_key" not in parent.data.params
    assert "hf_token" not in parent.data.params and "db.password" not in parent.data.params
    assert parent.data.params["storage.endpoint"] == "http://minio:***@127.0.0.1:9000"

    # two iteration children, nested under the parent
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
    assert sorted(r.info.run_name for r in kids) == ["iter-000000", "iter-000001"]
    assert sorted(r.info.run_id for r in kids) == sorted(res["children"])
    assert all(r.info.status == "FINISHED" for r in kids)

    # metrics per step: parent has both steps, each child its own; non-finite values skipped
    hist = client.get_metric_history(tracker.run_id, "reward_mean")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 0.5), (1, 1.5)]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "eval/geometry")] == [0, 1] or \
        sorted(m.step for m in client.get_metric_history(tracker.run_id, "eval/geometry")) == [0, 1]
    for it, rid in enumerate(res["children"]):
        h = client.get_metric_history(rid, "reward_mean")
        assert [(m.step, m.value) for m in h] == [(it, 0.5 + it)]
        run = client.get_run(rid)
        assert "kl" not in run.data.metrics and "clip_frac" not in run.data.metrics
        assert run.data.metrics["weight/step 3"] == 1.0
        # rollout shards as a dataset input, full sha256 kept in an input tag
        (di,) = run.inputs.dataset_inputs
        manifest = f"s3://runs/r1/iter-{it:06d}/rollouts/manifest.json"
        assert di.dataset.name == f"rollouts-iter-{it:06d}"
        assert di.dataset.source_type == "s3" and json.loads(di.dataset.source)["uri"] == manifest
        tags = {t.key: t.value for t in di.tags}
        assert tags["mlflow.data.context"] == "rollouts" and tags["num_samples"] == "12"
        assert tags["tempflow.digest"] == _sha(manifest)
        assert di.dataset.digest == _sha(manifest)[:36]
        # eval table as an artifact of the child
        arts = {a.path for a in client.list_artifacts(rid, "eval")}
        assert f"eval/iter-{it:06d}.md" in arts
    (pi,) = parent.inputs.dataset_inputs
    assert pi.dataset.name == "shapes-prompts"
    assert {t.key: t.value for t in pi.tags}["mlflow.data.context"] == "prompts"

    # checkpoints: LoggedModels chained back to the base through parent_model_id and run I/O
    m0, m1 = res["models"]
    lm1 = client.get_logged_model(m1)
    assert lm1.name == "tempflow-lora" and lm1.model_type == "lora-adapter"
    assert lm1.source_run_id == res["children"][1]
    assert lm1.tags["tempflow.checkpoint_uri"] == "s3://runs/r1/iter-000001/checkpoint/"
    assert lm1.tags["tempflow.rollout_manifest_uri"] == "s3://runs/r1/iter-000001/rollouts/manifest.json"
    assert lm1.params["parent_model_id"] == m0
    chain, mid = [], m1
    while mid != "base":
        chain.append(mid)
        mid = client.get_logged_model(mid).tags["tempflow.parent_model_id"]
    assert chain == [m1, m0]
    child1 = client.get_run(res["children"][1])
    assert [mi.model_id for mi in child1.inputs.model_inputs] == [m0]
    assert [(mo.model_id, mo.step) for mo in child1.outputs.model_outputs] == [(m1, 1)]
    assert client.get_run(res["children"][0]).inputs.model_inputs == []

    # adapter files downloadable from the logged model and through the registry alias: with
    # the tracker (this URI) and with plain MLflow (models:/ resolves via the global URI)
    def adapter_files(dst: pathlib.Path, it: int) -> None:
        names = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
        assert names == ["adapter_config.json", "adapter_model.safetensors"], names
        got = (dst / "adapter_model.safetensors").read_bytes()
        assert got == (tmp / f"lora-{it:06d}" / "adapter_model.safetensors").read_bytes()

    refs = ((m0, 0), (f"models:/{m1}", 1), (f"models:/{REGISTERED}@best", 1),
            (f"models:/{REGISTERED}/{res['version']}", 1))
    for n, (ref, it) in enumerate(refs):
        adapter_files(tracker.download_model(ref, tmp / f"dl-tracker-{n}"), it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for n, (ref, it) in enumerate(refs[1:]):
            adapter_files(pathlib.Path(mlflow.artifacts.download_artifacts(
                artifact_uri=ref, dst_path=str(tmp / f"dl-mlflow-{n}"))), it)
    mv = client.get_model_version_by_alias(REGISTERED, "best")
    assert str(mv.version) == res["version"] and mv.tags["tempflow.model_id"] == m1
    assert json.loads(client.get_logged_model(m1).tags["mlflow.modelVersions"]) == [
        {"name": REGISTERED, "version": res["version"]}]


@pytest.fixture
def no_env_uri(monkeypatch, tmp_path):
    """No tracking URI from the environment; the cwd is an empty folder that must stay free
    of a stray default store (./mlflow.db, ./mlruns): MLflow falls back to those silently."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert sorted(p.name for p in cwd.iterdir()) == [], "something wrote a default MLflow store"


def test_resolve_tracking_uri(tmp_path, monkeypatch, no_env_uri):
    monkeypatch.chdir("/")  # a cwd whose absolute form is known: relative paths resolve against it
    assert resolve_tracking_uri(None, pathlib.Path("r")) == "sqlite:////r/mlflow.db"
    assert resolve_tracking_uri(None, pathlib.Path("/x/r")) == "sqlite:////x/r/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db", tmp_path) == "sqlite:////rel.db"
    assert resolve_tracking_uri("sqlite:///rel.db?timeout=5", tmp_path) == "sqlite:////rel.db?timeout=5"
    assert resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    for bad in ("file:///tmp/mlruns", "./mlruns"):
        with pytest.raises(ValueError, match="file store"):
            resolve_tracking_uri(bad, tmp_path)


def test_secret_keys_dropped():
    flat = flatten_params(PARAMS)
    assert SECRET not in json.dumps(flat)
    assert {"train.lr", "model.tokenizer", "storage.uri", "storage.endpoint"} <= set(flat)
    for k in ("aws_secret_access_key", "AWS_ACCESS_KEY_ID", "s3.key_id", "hf_token", "authToken",
              "client_secret", "credentials_file", "db.password"):
        assert is_secret_key(k), k
    for k in ("tokenizer", "max_tokens", "model.key_frames", "lr"):
        assert not is_secret_key(k), k


def test_an_experiment_made_before_its_kind_was_tagged_gets_it(tmp_path, no_env_uri):
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(None, tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("made-earlier")
    assert "mlflow.experimentKind" not in client.get_experiment(eid).tags
    RunTracker(uri, "made-earlier", "train-test", PARAMS).finish()
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"


def test_sqlite_lineage_and_resume(tmp_path, no_env_uri):
    uri = resolve_tracking_uri(None, tmp_path / "run")
    tracker = RunTracker(uri, "tempflow-test", "train-test", PARAMS, tags={"prefect.flow_run_id": "f1",
                                                                          "s3_token": SECRET},
                         base_model="/models/tiny-sd3")
    res = run_two_iterations(tracker, tmp_path)
    check_readback(uri, tracker, res, tmp_path)
    # artifacts live next to the db, not under the current directory
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    mlflow_cli = pathlib.Path(sys.executable).with_name("mlflow")  # the venv's own: runs without activating it
    assert mlflow_cli.is_file() and os.access(mlflow_cli, os.X_OK)
    assert tracker.ui_command() == f"{mlflow_cli} ui --backend-store-uri {uri} --host 127.0.0.1"
    assert tracker.checkpoint_lineage(res["models"][1]) == res["models"][::-1]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    # re-attach (resume): same parent, the iteration child reused, checkpoint/registration idempotent
    changed = dict(PARAMS, train=dict(PARAMS["train"], iterations=3))
    again = RunTracker(uri, "tempflow-test", "train-test", changed, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    again.start_iteration(1)
    again.log_prompts_dataset("shapes-prompts", (tmp_path / "prompts.jsonl").as_uri(), _sha("prompts-v1"))
    assert len(client.get_run(tracker.run_id).inputs.dataset_inputs) == 1  # not duplicated
    assert again.iteration_run_id(1) == res["children"][1]
    assert again.log_checkpoint(1, tmp_path / "lora-000001", "s3://runs/r1/iter-000001/checkpoint/",
                                "s3://runs/r1/iter-000001/rollouts/manifest.json",
                                res["models"][0]) == res["models"][1]
    assert again.register(res["models"][1], REGISTERED, alias="best") == res["version"]
    again.end_iteration()
    again.start_iteration(2)
    again.log_metrics(2, {"reward_mean": 2.5})
    # concurrent Prefect tasks (threads) logging into the same iterations: one child each
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: again.log_metrics(3 + i % 2, {"stage_s": float(i)}), range(8)))
    again.finish("FAILED")
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.params["train.iterations"] == "2"  # params are immutable in MLflow
    assert parent.data.tags["tempflow.params_changed_on_resume"] == "train.iterations"
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "reward_mean")) == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "stage_s")) == [3] * 4 + [4] * 4
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
    assert sorted(r.info.run_name for r in kids) == [f"iter-{i:06d}" for i in range(5)]
    status = {r.info.run_name: r.info.status for r in kids}
    assert status["iter-000002"] == status["iter-000004"] == "FAILED"  # finish() ends open ones
    assert len(client.get_metric_history(again.iteration_run_id(3), "stage_s")) == 4
    assert len(client.search_logged_models([parent.info.experiment_id])) == 2

    # a run branched from this one records where it came from
    branch = RunTracker(uri, "tempflow-test", "train-branch", {}, parent_run_id=tracker.run_id)
    assert branch.run_id != tracker.run_id
    assert client.get_run(branch.run_id).data.tags["tempflow.resumed_from"] == tracker.run_id
    branch.finish()


def test_tracking_server_rest_readback(mlflow_server, tmp_path, no_env_uri):  # noqa: F811
    tracker = RunTracker(mlflow_server, "tempflow-test", "train-test", PARAMS)
    # Prefect may hand the tracker to another task/process: it pickles and re-attaches
    tracker = pickle.loads(pickle.dumps(tracker))
    res = run_two_iterations(tracker, tmp_path)
    check_readback(mlflow_server, tracker, res, tmp_path)
    assert mlflow_server in tracker.ui_command()


@pytest.fixture
def local_server():
    """Start a real server on 127.0.0.1 with a given handler; yields (start(handler) -> url)."""
    servers = []

    def start(handler: type) -> str:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_server_error_fails_fast(local_server, no_env_uri):
    """A server that answers 500: three health probes, then TrackingUnavailable and no MLflow
    call at all (MLflow's REST client would retry a 500 with backoff for minutes)."""
    seen: list[str] = []

    class Error500(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(f"GET {self.path}")
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            seen.append(f"POST {self.path}")
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    uri = local_server(Error500)
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.") + r".*HTTP Error 500"):
        RunTracker(uri, "tempflow-test", "train-test", {"a": 1})
    assert seen == ["GET /health"] * 3


def test_dropped_connections_fail_fast(local_server, no_env_uri):
    """A server that accepts and closes every connection: three attempts, then TrackingUnavailable."""
    accepted: list[int] = []

    class Drop(socketserver.BaseRequestHandler):
        def handle(self):
            accepted.append(1)  # before the close the client sees

    uri = local_server(Drop)
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        RunTracker(uri, "tempflow-test", "train-test", {"a": 1})
    assert len(accepted) == 3


def test_mlflow_telemetry_is_off_where_tempflow_tracks(tmp_path):
    """MLflow 3 writes ~/.config/mlflow/telemetry.json and sends usage events unless told not to
    (it keeps quiet by itself only under pytest and CI variables, removed here as on a user's
    machine); importing tempflow's tracking turns that off before MLflow loads."""
    import os
    import subprocess
    import sys

    code = ("import tasks.tracking, mlflow, time\n"
            "from mlflow.telemetry.utils import is_telemetry_disabled\nprint(is_telemetry_disabled())\n"
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path}/m.db')\n"
            "with mlflow.start_run():\n    mlflow.log_metric('a', 1.0)\ntime.sleep(1)\n")
    ci = {"PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ci}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=pathlib.Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.split()[0] == "True"
    assert not any((tmp_path / "home").rglob("telemetry.json"))
