"""The cost options through the pipeline's stages: a weighted branch draw and coarse children give
the in-process loop's adapter bit for bit, record the importance they trained with, and take
the rows the rollout's arithmetic says."""

import json

import torch
from safetensors.torch import load_file

from tempflow_core.algorithm.rollout import completion_rows
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.algorithm.train import branch_counts, train_in_process
from tempflow_core.config import load_config
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout

from .conftest import tiny_overrides


def test_weighted_draw_and_coarse_children_through_the_stages(tiny_model_dir, tmp_path):
    T = 6
    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir) + [
        "algorithm=tempflow", f"sampling.num_steps={T}", "rollout.branch_steps=2", "rollout.branch_draw=weighted",
        "rollout.completion_stride=2", "train.lr=0.01"])
    lay, sessions = RunLayout.open(cfg, "cost"), SessionCache()
    stages.init_stage(cfg, lay, sessions)
    for it in range(cfg.train.iterations):
        for stage in (stages.rollout_stage, stages.reward_stage, stages.learner_stage):
            stage(cfg, lay, it, sessions)
    ref = train_in_process(cfg, tmp_path / "inproc")
    got = sessions.get(cfg).policy.lora_state_dict()

    want = {k.removeprefix("transformer."): v for k, v in load_file(str(ref.lora_path)).items()}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)

    schedule = sessions.get(cfg).schedule
    rows = [json.loads(line) for line in (tmp_path / "inproc" / "metrics.jsonl").read_text().splitlines()]
    for it, m in enumerate(rows):
        counts = branch_counts(cfg, schedule, it)
        steps = sorted(counts)
        # backbone up to the last branch step, children over every 2nd node
        assert m["rollout/nfe"] == 2 * (steps[-1] + 1) + 2 * completion_rows(steps, T, 3, stride=2)
        imp = {int(k.rsplit("_", 1)[1]): v for k, v in m.items() if k.startswith("importance/step_")}
        assert sorted(imp) == steps and all(v > 0 for v in imp.values())
