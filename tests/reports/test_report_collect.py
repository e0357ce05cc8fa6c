"""`tempflow report DIR --store URI --kind K`: the records of a run store collected into a folder
(two runs of one iteration each, evaluated on shapes prompts), the report drawn from them, and the
same report redrawn from the folder alone; --store and --kind only together."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import load_config
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runs import open_run
from tests.pipeline.cli_runner import run_cli

RUNS = {"cost-tempflow-s0-0a0a0a": "tempflow", "cost-fixed-s0-0b0b0b": "flow_grpo_fixed"}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    for run, algorithm in RUNS.items():
        cfg = load_config(overrides=[
            f"model.path={tiny_model_dir}", f"algorithm={algorithm}", "train.iterations=1",
            "rollout.prompts_per_iter=2", "rollout.group_size=3", "lora.rank=4", "lora.alpha=8",
            "sampling.num_steps=3", "sampling.eval_num_steps=3", "reward.name=shapes",
            "prompts.source=builtin:shapes_train?tags=colors", "eval.prompts=builtin:shapes_eval",
            "eval.max_prompts=4", f"pipeline.store={root / 'store'}", f"output_dir={root / 'runs'}"])
        sessions, lay = SessionCache(), RunLayout.open(cfg, run)
        open_run(cfg, lay)  # the run's record, as the flow writes it
        stages.learner_stage(cfg, lay, 0, sessions)  # heals its way up: initial adapter, rollout, reward
        stages.eval_stage(cfg, lay, 0, sessions)
    return root / "store"


def _report(args: list[str], cwd):
    return run_cli(["report", *args], dict(os.environ), cwd, own_process=False)


def test_per_image_records_are_collected_and_their_pair_reported(store, tmp_path):
    out = tmp_path / "pairs"
    code, stdout, stderr = _report([str(out), "--store", str(store), "--kind", "paired"], tmp_path)
    assert code == 0, stdout + stderr
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["seed"], r["iteration"]) for r in records} == {("tempflow", 0, 1), ("flow_grpo_fixed", 0, 1)}
    assert len(records) == 2 * 4 and all(r["strict"] in (0, 1) for r in records)  # 4 images per run
    summary = (out / "summary.md").read_text()
    assert "| 1 | 1 |" in summary and "# tempflow - flow_grpo_fixed" in summary
    (out / "summary.md").unlink()
    code, stdout, stderr = _report([str(out)], tmp_path)  # from the folder alone
    assert code == 0 and (out / "summary.md").read_text() == summary, stdout + stderr


def test_points_and_images_of_each_arm_are_collected_and_compared(store, tmp_path):
    out = tmp_path / "cost"
    code, stdout, stderr = _report([str(out), "--store", str(store), "--kind", "cost", "--reference", "cost-tempflow"],
                                   tmp_path)
    assert code == 0, stdout + stderr
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert {p["arm"]: p["iteration"] for p in points} == {"cost-tempflow": 1, "cost-fixed": 1}
    assert all(p["rollout_rows"] > 0 and p["learner_rows"] > 0 for p in points)
    images = gzip.decompress((out / "images.jsonl.gz").read_bytes()).decode().splitlines()
    assert len(images) == 2 * 4
    assert json.loads((out / "comparison.json").read_text())["reference"] == "cost-tempflow"
    summary = (out / "summary.md").read_text()
    code, stdout, stderr = _report([str(out)], tmp_path)  # redrawn from the records: the same page
    assert code == 0 and (out / "summary.md").read_text() == summary, stdout + stderr


@pytest.mark.parametrize("args, words", [
    (["--store", "STORE"], ["--store needs --kind"]),
    (["--store", "STORE", "--kind", "sweep"], ["--store needs --kind", "'sweep'"]),
    (["--kind", "cost"], ["--kind cost", "--store"]),
    (["--store", "EMPTY", "--kind", "cost"], ["no evaluated run in store"]),
])
def test_collecting_needs_a_store_and_a_kind_of_records_and_refuses_before_writing(args, words, store, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [{"STORE": str(store), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    out = tmp_path / "out"
    code, stdout, stderr = _report([str(out), *args], tmp_path)
    assert code == 2 and "\n" not in stderr.strip() and all(w in stderr for w in words), stderr
    assert not out.exists()
