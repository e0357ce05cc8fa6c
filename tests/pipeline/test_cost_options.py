"""The cost options through the pipeline's stages: a weighted branch draw and coarse children give
the in-process loop's adapter bit for bit, record the importance they trained with, and take
the rows the rollout's arithmetic says."""

import json

import torch
from safetensors.torch import load_file

from tempflow_core.algorithm.rollout import completion_rows
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.train import train_in_process
from tempflow_core.config import load_config
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runs import write_run

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
        plan = plan_iteration(cfg, schedule, it)
        steps = list(plan.steps)
        # backbone up to the last branch step, children over every 2nd node: the rollout's own count of
        # its transformer calls, the plan's arithmetic and the hand count agree
        assert m["rollout/nfe"] == 2 * (steps[-1] + 1) + 2 * completion_rows(steps, T, 3, stride=2) == plan.rollout_nfe
        # transformer rows: SD3 under CFG runs a conditional and an unconditional row per sample-step
        assert m["rollout/rows"] == 2 * m["rollout/nfe"] and m["learner/rows"] == 2 * m["learner/nfe"] > 0
        imp = {int(k.rsplit("_", 1)[1]): v for k, v in m.items() if k.startswith("importance/step_")}
        assert sorted(imp) == steps and all(v > 0 for v in imp.values())


def test_rows_count_a_cfg_pair_as_two_and_a_guidance_free_row_as_one(tiny_model_dir, tmp_path):
    base = tiny_overrides(tmp_path, tiny_model_dir, iterations=1)
    assert load_config(overrides=base).rows_per_sample() == 2
    cfg = load_config(overrides=base + ["sampling.guidance_scale=1.0"])
    assert cfg.rows_per_sample() == 1
    train_in_process(cfg, tmp_path / "cfg-free")
    m = json.loads((tmp_path / "cfg-free" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["rollout/rows"] == m["rollout/nfe"] > 0 and m["learner/rows"] == m["learner/nfe"] > 0
    assert load_config(overrides=["model.tiny.family=flux"]).rows_per_sample() == 1  # guidance is an input


def test_a_checkpoint_scored_under_other_eval_settings_is_what_a_run_with_them_records(
        prefect_api, quiet_env, tiny_model_dir, tmp_path):
    """`tempflow eval --run R --set eval.guidance_scale=1`: the checkpoint of a run trained with
    CFG, scored without it, gives what a run with the same training and eval.guidance_scale=1
    records in its own eval stage (training does not read eval.*: the checkpoints are equal), and
    writes nothing into the run."""
    from flows.evaluate import eval_flow

    base = tiny_overrides(tmp_path, tiny_model_dir, iterations=1) + ["sampling.guidance_scale=3.0"]
    runs = {}
    for name, extra in (("cfg", []), ("free-eval", ["eval.guidance_scale=1.0"])):
        cfg = load_config(overrides=base + extra)
        lay, sessions = RunLayout.open(cfg, name), SessionCache()
        write_run(lay, {"run_id": name, "config": cfg.model_dump(mode="json")})
        stages.init_stage(cfg, lay, sessions)
        for stage in (stages.rollout_stage, stages.reward_stage, stages.learner_stage, stages.eval_stage):
            stage(cfg, lay, 0, sessions)
        runs[name] = (cfg, lay)
    cfg, lay = runs["cfg"]
    before = {k: lay.store.get_bytes(k) for k in lay.store.list("cfg")}
    got = eval_flow(config=cfg, run_id="cfg", iteration=0, eval_overrides={"guidance_scale": 1.0})
    want = stages.read_eval(runs["free-eval"][1], 0)
    own = stages.read_eval(lay, 0)
    assert [s["reward"] for s in got["samples"]] == [s["reward"] for s in want["samples"]]
    assert got["reward"] == want["reward"] and got["eval_overrides"] == {"guidance_scale": 1.0}
    assert got["guidance_scale"] == want["guidance_scale"] == 1.0 and own["guidance_scale"] == 3.0
    assert [s["reward"] for s in own["samples"]] != [s["reward"] for s in got["samples"]]  # CFG 3 scores differ
    assert {k: lay.store.get_bytes(k) for k in lay.store.list("cfg")} == before  # the run is as it was
