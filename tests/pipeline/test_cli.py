"""The `tempflow` CLI as a user runs it: bad configs, and a SIGKILL in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from tempflow_core.algorithm.train import train_in_process

from .cli_runner import run_cli
from .conftest import tiny_overrides

CLI = [sys.executable, "-m", "flows.cli"]


def _env(tmp_path: Path, prefect_api: str | None) -> dict[str, str]:
    # the CLI's processes use this process's torch thread count: float sums (and so the bytes
    # of a resumed run against the in-process reference) depend on it
    env = {**os.environ, "TEMPFLOW_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def test_invalid_config_exits_2_naming_the_field_and_writes_nothing(tmp_path):
    """The first case in a process of its own, the others through the same CLI in this one."""
    cases = (("rollout.group_size=-1", "rollout.group_size"), ("algorithm=ppo", "algorithm"),
             ("reward.bogus=1", "reward.bogus"), ("train.lr=fast", "train.lr"))
    for i, (override, field) in enumerate(cases):
        code, _, stderr = run_cli(["train", "--set", override], _env(tmp_path, None), tmp_path, own_process=i == 0)
        assert code == 2, stderr[-500:]
        assert field in stderr
    assert not (tmp_path / "home" / "store").exists() and not (tmp_path / "home" / "runs").exists()


def test_unknown_reward_is_refused_before_any_work(prefect_api, tiny_model_dir, tmp_path):
    args = ["train", "--run-id", "r"] + sum((["--set", o] for o in tiny_overrides(tmp_path, tiny_model_dir)), [])
    out = subprocess.run(CLI + args + ["--set", "reward.name=no_such_reward"], capture_output=True, text=True,
                         timeout=300, env=_env(tmp_path, prefect_api), cwd=tmp_path)
    assert out.returncode != 0 and "no_such_reward" in out.stderr
    assert not list((tmp_path / "store").glob("r/iter-*"))


def test_preset_fast_rewrites_a_new_runs_config_and_is_refused_where_it_cannot_apply(tiny_model_dir, tmp_path):
    sets = sum((["--set", o] for o in tiny_overrides(tmp_path, tiny_model_dir)), [])  # T = 4
    for i, (extra, field) in enumerate(((["--set", "algorithm=flow_grpo"], "algorithm"), ([], "sampling.num_steps"),
                                        (["--resume", "r"], "--resume"))):
        code, _, stderr = run_cli(["train", "--preset", "fast"] + sets + extra, _env(tmp_path, None), tmp_path,
                                  own_process=i == 0)
        assert code == 2 and field in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()
    out = subprocess.run(CLI + ["train", "--in-process", "--preset", "fast"] + sets + ["--set", "sampling.num_steps=5"],
                         capture_output=True, text=True, timeout=300, env=_env(tmp_path, None), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "preset fast: rollout.branch_steps all -> [0, 1, 2, 3], train.iterations 2 -> 1" in out.stdout
    (metrics,) = (tmp_path / "runs").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    # 1 iteration (ceil(2 / 2)) of 2 prompts at T = 5: backbone steps 0 to 3, then 3 children from each
    # step k over the 4 - k steps left
    assert [m["rollout/nfe"] for m in rows] == [2 * (4 + 3 * (4 + 3 + 2 + 1))]


def test_sigkill_mid_run_then_resume_gives_the_same_final_lora(prefect_api, tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tmp_path, tiny_model_dir, iterations=3)
    args = ["train", "--run-id", "killed"] + sum((["--set", o] for o in overrides), [])
    env = _env(tmp_path, prefect_api)
    proc = subprocess.Popen(CLI + args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    target = tmp_path / "store" / "killed" / "iter-000001" / "rollout"
    deadline = time.time() + 400
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of iteration 1's rollout stage
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "store" / "killed" / "iter-000002").exists()

    out = subprocess.run(CLI + ["train", "--resume", "killed", "--set", f"pipeline.store={tmp_path / 'store'}"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run killed finished" in out.stdout
    assert "  base model       : reward " in out.stdout and "(before training)" in out.stdout  # beside the final eval
    _hints_run_as_printed(out.stdout)

    import json

    from tempflow_core.config import RunConfig

    # the run's own config (the CLI's embedded default under the overrides), as stored with it
    record = json.loads((tmp_path / "store" / "killed" / "run.json").read_text())
    ref = train_in_process(RunConfig.model_validate(record["config"]), tmp_path / "reference")
    final = tmp_path / "store" / "killed" / "iter-000002" / "learner" / "adapter" / "pytorch_lora_weights.safetensors"
    got, want = st.load_file(str(final)), st.load_file(str(ref.lora_path))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # and the files: the exported adapter of the resumed run (written by other processes) has
    # the uninterrupted run's bytes, metadata included
    out = subprocess.run(CLI + ["export-lora", "killed", "--out", str(tmp_path / "lora"), "--store",
                                str(tmp_path / "store")], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    exported = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    assert exported == final.read_bytes() == ref.lora_path.read_bytes()
    assert exported[8:].startswith(b'{"__metadata__":{"format":"pt","lora_adapter_metadata":')  # sorted in any process
    recipe = (tmp_path / "lora" / "recipe.json").read_text()
    assert recipe == json.dumps(json.loads(recipe), indent=2, sort_keys=True)


def _hints_run_as_printed(stdout: str) -> None:
    """The end-of-run commands name executables that exist (the venv's own: the README's setup
    does not put them on PATH)."""
    import shlex

    hints = {ln.split(":", 1)[0].strip(" ("): ln.split(":", 1)[1].strip(" )") for ln in stdout.splitlines()
             if ln.strip().startswith(("Prefect UI", "MLflow UI", "(or both at once"))}
    assert set(hints) == {"Prefect UI", "MLflow UI", "or both at once"}, stdout[-1500:]
    for name, command in hints.items():
        words = [w for w in shlex.split(command) if "=" not in w or w.startswith("-")]
        assert os.access(words[0], os.X_OK) and Path(words[0]).parent == Path(sys.executable).parent, (name, command)


def test_an_empty_tempflow_home_counts_as_unset(tmp_path):
    import json

    out = subprocess.run(CLI + ["show-config"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**_env(tmp_path, None), "TEMPFLOW_HOME": ""})
    assert out.returncode == 0, out.stderr[-500:]
    cfg = json.loads(out.stdout)
    assert cfg["output_dir"] == str(tmp_path / ".tempflow" / "runs")
    assert cfg["pipeline"]["store"] == str(tmp_path / ".tempflow" / "store")


def test_a_config_from_the_repository_names_the_shipped_model_relative_to_the_checkout(tmp_path):
    import json

    checkout = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "bundle.yaml"
    cfg.write_text("algorithm: branch\nmodel:\n  path: models/tiny-shapes-sd3\n")
    out = subprocess.run(CLI + ["show-config", "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path, None), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-500:]
    assert json.loads(out.stdout)["model"]["path"] == str(checkout / "models" / "tiny-shapes-sd3")
    (tmp_path / "models" / "tiny-shapes-sd3").mkdir(parents=True)  # a folder of that name in the cwd wins
    out = subprocess.run(CLI + ["show-config", "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path, None), cwd=tmp_path)
    assert json.loads(out.stdout)["model"]["path"] == "models/tiny-shapes-sd3"


def test_an_error_raised_while_prefect_handles_a_ctrl_c_exits_as_a_ctrl_c():
    """Prefect's task engine can raise ValueError('Task run is not set') while it handles a
    KeyboardInterrupt that came as it started a task run (seen in CI): the CLI still reports an
    interrupt (exit 130), not a failed run."""
    from flows.cli import _interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")
    except ValueError as e:
        assert _interrupted(e)
    try:
        try:
            raise OSError("disk")
        except OSError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as e:
        assert not _interrupted(e)


def test_a_runs_config_yaml_gives_the_same_config_back_with_credentials_masked(tmp_path):
    """The reproduce command in an MLflow run's description: `tempflow train --config config.yaml`
    with the run's config.yaml artifact (tempflow_core.run.runs.config_yaml) runs the same config."""
    import json

    from tempflow_core.config import RunConfig
    from tempflow_core.run.runs import config_yaml, display_name

    cfg = RunConfig.model_validate({
        "algorithm": "reweight", "model": {"path": str(tmp_path / "model")}, "train": {"seed": 3, "betas": [0.8, 0.99]},
        "reward": {"name": "weighted", "weights": {"shapes": 0.7, "brightness": 0.3},
                   "options": {"shapes": {"strict": True}, "pickscore": {"api_token": "hunter2"}}},
        "rollout": {"branch_steps": [1, 3]}, "output_dir": str(tmp_path / "runs")})
    text = config_yaml(cfg)
    assert "hunter2" not in text and "api_token: '***'" in text
    (tmp_path / "config.yaml").write_text(text)
    out = subprocess.run(CLI + ["show-config", "--config", str(tmp_path / "config.yaml")], capture_output=True,
                         text=True, timeout=120, env=_env(tmp_path, None), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-500:]
    again = json.loads(out.stdout)
    expected = cfg.model_dump(mode="json")
    expected["reward"]["options"]["pickscore"]["api_token"] = "***"  # set it again to reproduce
    assert again == expected
    assert display_name(cfg, "reweight-1a2b3c4d5e6f") == "reweight-1a2b3c4d5e6f · weighted · seed 3"


def test_show_config_defaults_sets_each_demo_setting_beside_the_codes_with_its_reason(tmp_path):
    """The embedded default (flows/configs/default.yaml) is the one place of the demo's settings:
    every value it sets has a reason on its line, and show-config --defaults prints both columns."""
    import yaml

    from flows.defaults import EMBEDDED, reasons, table
    from tempflow_core.config import RunConfig

    out = subprocess.run(CLI + ["show-config", "--defaults"], capture_output=True, text=True, timeout=120,
                         env=_env(tmp_path, None), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-500:]
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.splitlines()[1:]}
    why = reasons()
    assert set(rows) == set(why) and all(why.values()), [k for k, v in why.items() if not v]  # each with a reason
    flat = {}
    for section, values in yaml.safe_load(EMBEDDED.read_text()).items():
        flat.update({f"{section}.{k}": v for k, v in values.items()} if isinstance(values, dict) else {section: values})
    assert set(flat) == set(why)  # the parser saw every setting the file makes
    assert rows["lora.rank"][:2] == [str(RunConfig().lora.rank), "8"] and rows["reward.name"][:2] == ['"brightness"', '"shapes"']
    (tmp_path / "bare.yaml").write_text("train:\n  lr: 0.1\n  seed: 3  # a reason\n")
    assert table(tmp_path / "bare.yaml") == [("train.lr", "0.0003", "0.1", ""), ("train.seed", "0", "3", "a reason")]


def test_eval_of_a_run_under_other_settings_takes_eval_fields_only_and_an_out_file(tmp_path):
    from tempflow_core.config import load_config
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.run.runs import write_run

    store = tmp_path / "store"
    cfg = load_config(overrides=[f"pipeline.store={store}"])
    write_run(RunLayout.open(cfg, "r"), {"run_id": "r", "config": cfg.model_dump(mode="json")})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra, needle in ((["--set", "sampling.guidance_scale=1"], "--set sampling.guidance_scale: with --run only eval.*"),
                          (["--set", "eval.guidance_scale=1"], "pass --out FILE")):
        out = subprocess.run(CLI + ["eval", "--run", "r", "--store", str(store)] + extra + (
            ["--out", str(tmp_path / "o.json")] if "--out" not in needle else []),
            capture_output=True, text=True, timeout=120, env=_env(tmp_path, None), cwd=tmp_path)
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-500:]
        assert out.stderr.strip().count("\n") == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_run_id_that_is_not_one_safe_name_is_refused_before_any_state(tmp_path):
    """`--run-id` and `--resume` name one folder of the store: a path (`../x`, `/abs`, `a/b`), `.`
    or a name with other characters is refused in one line, exit 2, with nothing written."""
    from tempflow_core.run.layout import check_run_id

    for bad in (".", "a/b", "x y", "..", "a..b", "-x", "x" * 201, "\u202ex"):
        with pytest.raises(ValueError, match="not a single safe name"):
            check_run_id(bad)
    assert check_run_id("tempflow-20261207-123456-1a2b.c_d") == "tempflow-20261207-123456-1a2b.c_d"
    for i, (flag, bad) in enumerate((("--run-id", "../x"), ("--run-id", "/abs"), ("--resume", "../../etc"))):
        code, _, stderr = run_cli(["train", flag, bad, "--set", f"pipeline.store={tmp_path / 'store'}"],
                                  _env(tmp_path, None), tmp_path, own_process=i == 0)
        assert code == 2, (bad, stderr[-500:])
        assert stderr.strip().count("\n") == 0 and "not a single safe name" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no Prefect state, no runs


def test_a_store_or_run_folder_holding_other_things_is_refused_with_exit_2_and_left_as_it_was(tmp_path):
    """`pipeline.store=file:///etc` and `--run-id ssh` on a copy of /etc: one line naming the
    setting or the folder and the fix, exit 2, nothing written (no run.json, init/ or prompts/)."""
    etc = tmp_path / "etc"
    (etc / "ssh").mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "ssh" / "sshd_config").write_text("PermitRootLogin no\n")
    before = sorted(str(p.relative_to(etc)) for p in etc.rglob("*"))
    cases = ((["--set", f"pipeline.store={etc.as_uri()}"], "pipeline.store: " + etc.as_uri(), "pipeline.shared_store=true"),
             (["--set", f"pipeline.store={etc}", "--set", "pipeline.shared_store=true", "--run-id", "ssh"],
              "--run-id ssh: " + (etc / "ssh").as_uri(), "choose another run id"))
    for i, (args, named, fix) in enumerate(cases):
        code, _, stderr = run_cli(["train"] + args, _env(tmp_path, None), tmp_path, own_process=i == 0)
        assert code == 2, stderr[-800:]
        assert named in stderr and fix in stderr and stderr.strip().count("\n") == 0, stderr
    assert sorted(str(p.relative_to(etc)) for p in etc.rglob("*")) == before
    assert not (tmp_path / "home").exists()  # no Prefect database, so no flow run


def test_a_run_another_live_process_writes_is_refused_with_exit_2_before_a_flow_run_exists(tmp_path):
    import socket

    store = tmp_path / "store"
    (store / "busy").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (store / "busy" / "lock.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                              "token": "x", "since": "now"}))
        out = subprocess.run(CLI + ["train", "--run-id", "busy", "--set", f"pipeline.store={store}"],
                             capture_output=True, text=True, timeout=120, env=_env(tmp_path, None), cwd=tmp_path)
    finally:
        other.kill()
        other.wait()
    assert out.returncode == 2, out.stderr[-800:]
    assert f"run 'busy' is being written by pid {other.pid}" in out.stderr and out.stderr.strip().count("\n") == 0
    assert not (tmp_path / "home").exists()  # no Prefect database, so no flow run
    assert sorted(p.name for p in (store / "busy").iterdir()) == ["lock.json"]


def test_a_command_leaves_no_temporary_folder_behind(tmp_path):
    """Importing diffusers makes torch create $TMPDIR/torchinductor_<user>; the CLI points that
    cache at a scratch folder of its own and removes it when it ends."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = subprocess.run(CLI + ["plan", "--set", "model.path=null", "--set", "sampling.num_steps=2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**_env(tmp_path, None), "TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr[-800:]
    assert sorted(p.name for p in scratch.iterdir()) == []
