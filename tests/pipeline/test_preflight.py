"""Bad input to `tempflow train` is refused before any work: exit code 2, one line that names
the field (or file) and the fix, and no file created anywhere (working folder, TEMPFLOW_HOME,
HOME). All of them fail in the pre-flight check, so none starts Prefect or loads a model. The
cases that depend on the process (its environment's credentials, the console script's exit
code, a secret that must not reach the output) run the real CLI in a subprocess; the others run
the same command in this process (typer's runner: the CLI's own code, its exit code and stderr)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tempflow_core.config import RunConfig, load_config
from tempflow_core.run.preflight import PROMPT_ID, PreflightError, check_prompts, preflight

from .cli_runner import CLI as TEMPFLOW, run_cli

CLI = [*TEMPFLOW, "train"]
CHECKOUT = Path(__file__).resolve().parents[2]
SHIPPED = CHECKOUT / "models" / "tiny-shapes-sd3"
SECRET = "hunter2-preflight-secret"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(cwd: Path) -> None:
    """The bad files the table points at, in the working folder."""
    (cwd / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (cwd / "five.jsonl").write_text("5\n")
    (cwd / "space-id.jsonl").write_text('{"id": "a b", "prompt": "a red circle"}\n')
    (cwd / "dup-id.jsonl").write_text('{"id": "p1", "prompt": "a red circle"}\n{"id": "p1", "prompt": "a blue square"}\n')
    (cwd / "not-a-model").mkdir()
    (cwd / "half-model").mkdir()
    shutil.copy(SHIPPED / "model_index.json", cwd / "half-model" / "model_index.json")  # no component folders
    (cwd / "a-file").write_text("not a folder\n")
    (cwd / "nul.txt").write_bytes(b"a red circle\na blue\x00 square\n")
    (cwd / "huge-line.txt").write_text("a red circle " * 10_000 + "\n")
    (cwd / "long.txt").write_text("a red circle\n" + "a red circle and a blue square " * 3 + "\n")
    (cwd / "etc" / "ssh").mkdir(parents=True)
    (cwd / "etc" / "passwd").write_text("root:x:0:0\n")
    for name, changes in (("layers-bomb", {"num_layers": 10**9}),  # built even on meta: a billion modules
                          ("huge-model", {"num_layers": 24, "num_attention_heads": 64, "attention_head_dim": 1024})):
        shutil.copytree(SHIPPED, cwd / name, ignore=shutil.ignore_patterns("*.safetensors"))
        conf = cwd / name / "transformer" / "config.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), **changes}))
    (cwd / "sdxl").mkdir()
    (cwd / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')


# (case, CLI arguments, field named in the message); {port} is a closed port on 127.0.0.1,
# {moto} the session's S3 server.
CASES = [
    ("binary config", ["--config", "binary.yaml"], "--config"),
    ("model folder missing", ["--set", "model.path=/nonexistent/model"], "model.path"),
    ("model folder without model_index.json", ["--set", "model.path=not-a-model"], "model.path"),
    ("model component missing", ["--set", "model.path=half-model"], "model.path"),
    ("model declaring a billion layers", ["--set", "model.path=layers-bomb"], "model.path"),
    ("model whose weights exceed this machine's memory", ["--set", "model.path=huge-model"], "model.path"),
    ("pipeline class not supported", ["--set", "model.path=sdxl"], "model.path"),
    ("unknown reward", ["--set", "reward.name=nosuch"], "reward.name"),
    ("unknown reward option", ["--set", "reward.options={shapes: {bogus: 1}}"], "reward.options.shapes.bogus"),
    ("reward needing a model folder", ["--set", "reward.name=clipscore"], "reward.options.clipscore.model"),
    ("weighted reward without weights", ["--set", "reward.name=weighted"], "reward.weights"),
    ("prompt record not an object", ["--set", "prompts.source=five.jsonl"], "prompts.source"),
    ("prompt id not a store key", ["--set", "prompts.source=space-id.jsonl"], "prompts.source"),
    ("unknown builtin prompt set", ["--set", "prompts.source=builtin:nosuch"], "prompts.source"),
    ("a NUL in a prompt", ["--set", "prompts.source=nul.txt"], "prompts.source"),
    ("a 130 kB prompt", ["--set", "prompts.source=huge-line.txt"], "prompts.source"),
    ("a prompt longer than the model reads", ["--set", "prompts.source=long.txt"], "prompts.source"),
    ("test prompts with a repeated id", ["--set", "prompts.test_source=dup-id.jsonl"], "prompts.test_source"),
    ("eval prompts missing", ["--set", "eval.prompts=missing.txt"], "eval.prompts"),
    ("unknown eval reward", ["--set", "eval.extra_reward=nosuch"], "eval.extra_reward"),
    ("registered model name", ["--set", "pipeline.registered_model=team/lora"], "pipeline.registered_model"),
    ("MLflow file store", ["--set", "pipeline.mlflow_uri=/tmp/mlruns"], "pipeline.mlflow_uri"),
    ("MLflow server down (credentials in the URI)",
     ["--set", f"pipeline.mlflow_uri=http://user:{SECRET}@127.0.0.1:" + "{port}"], "pipeline.mlflow_uri"),
    ("store root holding other things", ["--set", "pipeline.store=etc"], "pipeline.store"),
    ("a credential in a reward option", ["--set", "reward.options={shapes: {api_key: " + SECRET + "}}"],
     "reward.options.shapes.api_key"),
    ("credentials in the S3 endpoint URL", ["--set", f"pipeline.s3_endpoint_url=http://minio:{SECRET}@127.0.0.1:9000"],
     "pipeline.s3_endpoint_url"),
    ("store under a file", ["--set", "pipeline.store=a-file/store"], "pipeline.store"),
    ("S3 without credentials", ["--set", "pipeline.store=s3://tempflow-test/runs", "--set",
                                "pipeline.s3_endpoint_url={moto}"], "pipeline.store"),
    ("S3 bucket missing", ["--set", "pipeline.store=s3://tempflow-missing/runs", "--set",
                           "pipeline.s3_endpoint_url={moto}"], "pipeline.store"),
    ("S3 endpoint down", ["--set", "pipeline.store=s3://tempflow-test/runs", "--set",
                          "pipeline.s3_endpoint_url=http://127.0.0.1:{port}"], "pipeline.s3_endpoint_url"),
]


def _tree(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")} | {str(r) for r in roots if r.exists()}


# run in a subprocess of their own (the rest in this process, see the module docstring)
IN_A_PROCESS = {"binary config", "model folder missing", "S3 without credentials",
                "MLflow server down (credentials in the URI)", "a credential in a reward option"}


@pytest.mark.parametrize("case,args,field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(s3_server, tmp_path, case, args, field):
    cwd, home, user_home = tmp_path / "cwd", tmp_path / "tempflow-home", tmp_path / "user-home"
    cwd.mkdir()
    user_home.mkdir()
    _inputs(cwd)
    args = [a.replace("{port}", str(_closed_port())).replace("{moto}", s3_server) for a in args]
    env = {**os.environ, "TEMPFLOW_HOME": str(home), "HOME": str(user_home), "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if case == "S3 without credentials":
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(var, None)
        env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    before = _tree(cwd, user_home)
    code, stdout, stderr = run_cli(["train", *args], env, cwd, own_process=case in IN_A_PROCESS)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    assert "; fix: " in lines[0].split(f"{field}: ", 1)[1], lines[0]
    assert "Traceback" not in stderr and "--resume" not in stderr
    assert SECRET not in stderr + stdout
    assert not home.exists(), sorted(_tree(home))
    assert _tree(cwd, user_home) == before


def test_a_rejected_config_leaves_no_prefect_folder_in_the_working_folder(tmp_path):
    """Without TEMPFLOW_HOME the state goes to ./.tempflow: a rejected run must not create it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEMPFLOW_HOME", "PREFECT_HOME")}
    out = subprocess.run(CLI + ["--set", "reward.name=nosuch"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_default_passes(tmp_path):
    cfg = load_config(CHECKOUT / "flows" / "configs" / "default.yaml",
                      [f"model.path={SHIPPED}", f"pipeline.store={tmp_path / 'store'}"])
    preflight(cfg)
    assert not (tmp_path / "store").exists()


def test_prompt_ids_follow_the_sample_key_rule():
    from tempflow_core.shards.schema import SAMPLE_KEY

    assert PROMPT_ID.pattern == SAMPLE_KEY.pattern
    for name in ("000001", "a-b_c", "Z9"):
        assert check_prompts_ok(name)
    for name in ("a b", "_x", "a/b", "ü"):
        assert not check_prompts_ok(name)


def check_prompts_ok(prompt_id: str) -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "p.jsonl"
        f.write_text(json.dumps({"id": prompt_id, "prompt": "a red circle"}) + "\n")
        try:
            check_prompts(str(f), "prompts.source")
        except PreflightError:
            return False
        return True


def test_registered_model_names_mlflow_refuses_are_refused():
    """Every name refused here that MLflow's own validator also refuses is refused by both."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    def ours(name: str) -> bool:
        try:
            cfg = RunConfig()
            preflight(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"registered_model": name})}),
                      check_store=False)
            return True
        except PreflightError as e:
            assert e.field == "pipeline.registered_model"
            return False

    for name in ("tempflow-lora", "team.lora_v2"):
        _validate_model_name(name)
        assert ours(name), name
    for name in ("a/b", "a:b", " "):
        with pytest.raises(MlflowException):
            _validate_model_name(name)
        assert not ours(name), name
    assert not ours("lora@best")  # '@' separates the alias in models:/name@alias


def test_the_flow_runs_the_same_check_before_any_stage(prefect_api, tmp_path, quiet_env):
    """A run started without the CLI (the Prefect UI, the API) fails in the pre-flight check and
    leaves no run record, stage output or MLflow database."""
    from flows.train import train_flow

    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"pipeline.store={tmp_path / 'store'}",
                             "prompts.source=builtin:nosuch"])
    with pytest.raises(PreflightError, match=r"^prompts.source: unknown builtin prompt set 'builtin:nosuch'"):
        train_flow(config=cfg, run_id="never")
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_deployment_runs_read_local_files_only_under_the_read_roots(tmp_path, monkeypatch):
    from flows.train import preflight_check

    prompts = tmp_path / "elsewhere" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a red circle\n")
    cfg = load_config(None, [f"prompts.source={prompts}", f"pipeline.store={tmp_path / 'store'}"])
    preflight_check(cfg)  # not from a deployment: any readable file
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.delenv("TEMPFLOW_READ_ROOTS", raising=False)
    with pytest.raises(PreflightError, match=r"^prompts.source: .* lies outside the folders deployment runs may read"):
        preflight_check(cfg)
    monkeypatch.setenv("TEMPFLOW_READ_ROOTS", str(tmp_path / "elsewhere"))
    preflight_check(cfg)
    root = tmp_path / "root"  # a link inside a root to a file outside it
    root.mkdir()
    (root / "prompts.txt").symlink_to(prompts)
    monkeypatch.setenv("TEMPFLOW_READ_ROOTS", str(root))
    with pytest.raises(PreflightError, match="lies outside"):
        preflight_check(cfg.model_copy(update={"prompts": cfg.prompts.model_copy(
            update={"source": str(root / "prompts.txt")})}))
