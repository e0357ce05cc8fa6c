"""Deployments load; an exported LoRA reproduces the evaluated images in plain diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_deployment_file_loads_and_entrypoints_import():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"nightly", "evaluate", "paper-ablation"}
    flows = set()
    for d in spec["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        flows.add(flow.name)
        params = flow.validate_parameters(d["parameters"])  # the deployment's parameters fit the form
        assert params.get("config", params.get("base")).pipeline.gpu_limit == "tempflow-gpu"
        assert d["work_pool"]["name"] == "tempflow-process"
        for sch in d.get("schedules", []):
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=sch["cron"], timezone=sch["timezone"])
    assert flows == {"tempflow-train", "tempflow-eval", "tempflow-ablation"}
    # the ablation deployment runs what the shipped bundle was made with
    from flows.ablation import ablation_flow
    from tempflow_core.config import load_config

    deployed = ablation_flow.validate_parameters(
        next(d for d in spec["deployments"] if d["name"] == "paper-ablation")["parameters"])["base"]
    shipped = load_config(ROOT / "flows" / "configs" / "ablation.yaml",
                          base=yaml.safe_load((ROOT / "flows" / "configs" / "default.yaml").read_text()))
    for section in ("model", "sampling", "rollout", "lora", "train", "loss", "eval", "reward", "prompts"):
        assert getattr(deployed, section) == getattr(shipped, section), section
    # nightly and evaluate start from the embedded default of `tempflow train`, not RunConfig()'s
    # random tiny model on the brightness reward; only where results go and the GPU limit differ
    from flows.evaluate import eval_flow
    from flows.train import train_flow
    from tempflow_core.config import RunConfig

    default = load_config(ROOT / "flows" / "configs" / "default.yaml")
    for name, flow in (("nightly", train_flow), ("evaluate", eval_flow)):
        cfg = flow.validate_parameters(next(d for d in spec["deployments"] if d["name"] == name)["parameters"])["config"]
        assert cfg.model_dump(exclude={"pipeline"}) == default.model_dump(exclude={"pipeline"}), name
        assert (cfg.model.path, cfg.reward.name, cfg.prompts.source) == ("models/tiny-shapes-sd3", "shapes",
                                                                         "builtin:shapes_train"), name
        assert cfg.digest() != RunConfig().digest()
        assert (ROOT / cfg.model.path / "model_index.json").is_file()  # relative to the checkout (the pull step)


def test_exported_lora_reproduces_eval_images_with_plain_diffusers(prefect_api, tiny_model_dir, tmp_path, quiet_env):
    import json

    import torch

    from flows.train import train_flow
    from tempflow_core.config import load_config
    from tempflow_core.run.export import export_lora
    from tempflow_core.policies.models import load_pipeline
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.run.stages import read_eval

    from .conftest import tiny_overrides

    cfg = load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir, iterations=1) + ["train.lr=0.05"])
    train_flow(config=cfg, run_id="exp")
    lay = RunLayout.open(cfg, "exp")
    out = export_lora(cfg, lay, 0, tmp_path / "export", resolution=32)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["num_inference_steps"] == 4 and recipe["guidance_scale"] == cfg.guidance_scale()
    readme = (out / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, str(out / "README.md"), "exec"), scope)  # the exported README's snippet runs as written
    assert scope["image"].size == (recipe["resolution"], recipe["resolution"])

    ev = read_eval(lay, 0)
    pipe = load_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(out))
    got = []
    for s in ev["samples"][:3]:
        img = pipe(s["prompt"], num_inference_steps=recipe["num_inference_steps"], guidance_scale=recipe["guidance_scale"],
                   height=32, width=32, max_sequence_length=0, generator=torch.Generator().manual_seed(s["seed"]),
                   output_type="np").images[0]
        got.append((img * 255).round().astype(np.uint8))
    from tempflow_core.algorithm import evaluation
    from tempflow_core.algorithm.session import setup

    s_ = setup(cfg)
    from tempflow_core.algorithm.checkpoint import load_checkpoint

    s_.policy.load_lora_state_dict(load_checkpoint(lay.store, lay.prefix(0, "learner")).lora)
    result, _ = evaluation.evaluate_policy(cfg, s_.policy, s_.reward_fn, evaluation.eval_prompts(cfg)[:3])
    from tempflow_core.algorithm.rollout import sample_images
    from tempflow_core.algorithm.schedule import make_schedule

    ours = sample_images(s_.policy, [x["prompt"] for x in ev["samples"][:3]],
                         [f"{r.id}_s0" for r in evaluation.eval_prompts(cfg)[:3]],
                         make_schedule(4, cfg.sampling.shift), cfg.guidance_scale(), cfg.eval.seed)
    diff = np.abs(np.stack(got).astype(int) - ours.astype(int))
    assert diff.max() <= 2, diff.max()  # float rounding only
    assert result["samples"][0]["seed"] == ev["samples"][0]["seed"]
