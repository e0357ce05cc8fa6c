"""Config validation names the bad field; variants derive from one field."""

import subprocess
import sys
from pathlib import Path

import pytest

from tempflow_core.config import ConfigError, RunConfig, load_config


@pytest.mark.parametrize("override, field", [
    ("rollout.group_size=-3", "rollout.group_size"),
    ("algorithm=ppo", "algorithm"),
    ("train.lr=abc", "train.lr"),
    ("rollout.bogus=1", "rollout.bogus"),
    ("rollout.branch_steps=[12]", "branch_steps"),
    ("sampling.guidance_scale=0.5", "sampling.guidance_scale"),
    ("rollout.completion_stride=0", "rollout.completion_stride"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("algorithm: branch\nrollout:\n  group_size: 3\n")
    cfg = load_config(f, ["train.lr=0.01", "rollout.branch_steps=[0, 2]"])
    assert cfg.algorithm == "branch" and cfg.rollout.group_size == 3 and cfg.train.lr == 0.01
    assert cfg.rollout.branch_steps == [0, 2]
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_variants():
    v = {a: RunConfig(algorithm=a) for a in ("flow_grpo", "flow_grpo_fixed", "reweight", "branch", "tempflow")}
    assert [v[a].branching for a in v] == [False, False, False, True, True]
    assert [v[a].std_mode for a in v] == ["global", "group", "group", "group", "group"]
    assert [v[a].noise_aware for a in v] == [False, False, True, False, True]
    assert v["tempflow"].digest() != v["branch"].digest()


def test_a_check_across_fields_is_one_line_without_the_whole_config():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["rollout.branch_draw=weighted"])
    assert str(e.value) == ("invalid run config:\n  rollout.branch_draw='weighted' draws m steps per iteration, and "
                            "rollout.branch_steps is 'all': set branch_steps to a count m")


def test_cost_options_name_their_field_and_change_the_digest_only_when_set():
    with pytest.raises(ConfigError, match=r"rollout\.completion_stride \(2\).*'flow_grpo_fixed' does not branch"):
        load_config(overrides=["algorithm=flow_grpo_fixed", "rollout.completion_stride=2"])
    with pytest.raises(ConfigError, match=r"rollout\.branch_steps \[0, 5\] names the last step 5.*sde_type=cps"):
        load_config(overrides=["sampling.num_steps=6", "sampling.sde_type=cps", "rollout.branch_steps=[0,5]"])
    base = RunConfig(algorithm="tempflow")
    assert RunConfig(algorithm="tempflow", sampling={"sde_type": "flow_grpo"}).digest() == base.digest()
    assert RunConfig(algorithm="tempflow", sampling={"sde_type": "cps"}).digest() != base.digest()
    assert RunConfig(algorithm="tempflow", rollout={"completion_stride": 1}).digest() == base.digest()
    assert RunConfig(algorithm="tempflow", rollout={"completion_stride": 2}).digest() != base.digest()


def test_core_imports_no_orchestration():
    """Every module of tempflow_core imports without Prefect, MLflow, flows/ or tasks/."""
    code = ("import importlib, pkgutil, sys, tempflow_core\n"
            "names = [m.name for m in pkgutil.walk_packages(tempflow_core.__path__, 'tempflow_core.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'flows', 'tasks')]\n"
            "print(len(names), sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, bad = out.stdout.strip().split(" ", 1)
    assert int(count) >= 30, out.stdout  # the walk reached the subpackages (rewards, shapes, shards, ...)
    assert bad == "[]", out.stdout


def test_the_committed_ablation_runs_keep_their_digests():
    """A run's id embeds its config's digest, and resuming compares digests: a new setting at its
    default must leave the digest of every existing config as it was. The committed ablation's
    run ids (results/ablation/runs.json) recompute from its committed configs."""
    import json

    import yaml

    root = Path(__file__).resolve().parents[2] / "results" / "ablation"
    runs = json.loads((root / "runs.json").read_text())
    checked = 0
    for reward, record in runs.items():
        for path in sorted((root / reward / "configs").glob("*.yaml")):
            variant, seed = path.stem.rsplit("-s", 1)
            cfg = RunConfig.model_validate(yaml.safe_load(path.read_text()))
            assert f"abl-{reward}-{variant}-s{seed}-{cfg.digest()[:6]}" == record["runs"][variant][seed], path
            checked += 1
    assert checked == 30


BOMB = "\n".join([f"l0: &l0 [{', '.join(['lol'] * 9)}]"] + [
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"  # 1 kB, 9^9 values expanded


@pytest.mark.parametrize("name, text, needle", [
    ("bomb.yaml", BOMB, "expands to more than 100,000 values"),
    ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than 32 levels"),
    ("huge.yaml", "a: '" + "x" * (1 << 20) + "'\n", "over the 1,048,576 a run config may take"),
])
def test_a_hostile_config_file_is_refused_within_bounds_before_it_expands(tmp_path, name, text, needle):
    """A 'billion laughs' alias file, 5000 nested lists and a 1 MiB file: refused in one line,
    exit 2 (the alias file used to expand for 47 s into a MemoryError)."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / name)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "show-config", "--config", str(tmp_path / name)],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 2 and needle in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-500:]


def test_yaml_anchors_within_bounds_still_load(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("train: &t {lr: 0.01, seed: 3}\neval: {seed: 3}\nrollout: {group_size: 3}\n")
    assert load_config(f).train.lr == 0.01
