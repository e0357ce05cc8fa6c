"""The learner sharded with FSDP2 (train.sharding=fsdp) over 2 gloo processes: its checkpoint
equals the one-process learner stage's within float32 summation order, and so does the plain
data-parallel learner's on the same rollouts.

The config makes the ranks' work uneven, the case a sharded transformer cannot run without
padding (each forward and backward is a collective): 4 units in 3 minibatches (of 2, 1 and 1
units) over 2 ranks of one rollout shard each, for 2 epochs. A one-unit minibatch leaves one rank
without a unit, which runs a pad call; in this draw both two-unit minibatches hold a unit of each
rank, so their gradients are summed across ranks. The KL reference, the recomputed old log-probs
and the EMA (which gathers the LoRA at every optimizer step) each add collectives of their own.
Measured against one process: LoRA delta 1.9e-5, EMA 3.0e-5, moments 5.8e-6 (relative), the
same for both learners. All three processes run
one torch thread (thread counts change the summation order of every matmul).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tempflow_core.algorithm.checkpoint import load_checkpoint
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import ConfigError, load_config
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout

ROOT = Path(__file__).resolve().parents[2]
# One update's LoRA delta and AdamW moments against the one-process update, relative to their
# norms (the Ray learner's tolerances, tests/pipeline/test_ray_engine.py).
LORA_RTOL = 1e-3
MOMENT_RTOL = 5e-4


def _overrides(model: Path, store: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", "train.iterations=1", "rollout.prompts_per_iter=2", "rollout.group_size=3",
            "rollout.slices=2", "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3", "model.device=cpu",
            "train.minibatches=3", "train.inner_epochs=2", "train.recompute_old_log_probs=true", "loss.beta=0.01",
            "train.ema_decay=0.9", "train.ema_update_interval=1", f"pipeline.store={store}",
            f"output_dir={store.parent / 'runs'}", "prompts.source=builtin:colors", *extra]


def _process(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


_RANK = """
    import json, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from tempflow_core.algorithm.session import SessionCache
    from tempflow_core.config import load_config
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout
    rank, pg, runs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo", store=dist.FileStore(pg, 2), rank=rank, world_size=2)
    for overrides in runs:  # plain data-parallel, then sharded
        cfg, sessions = load_config(overrides=overrides), SessionCache()
        stages.learner_rank(cfg, RunLayout.open(cfg, "r"), 0, sessions, rank, 2)
        params = list(sessions.get(cfg, cfg.train.sharding == "fsdp").policy.transformer.parameters())
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        print("HELD", held / sum(p.numel() for p in params))  # this rank's share of the transformer's weights
    dist.destroy_process_group()
    print("DONE")
"""

_ONE = """
    import json, sys, torch
    torch.set_num_threads(1)
    from tempflow_core.algorithm.session import SessionCache
    from tempflow_core.config import load_config
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout
    cfg = load_config(overrides=json.loads(sys.argv[1]))
    stages.learner_stage(cfg, RunLayout.open(cfg, "r"), 0, SessionCache())
    print("DONE")
"""


def _relative(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    return float((got - want).float().norm() / scale.float().norm().clamp_min(1e-12))


def test_the_fsdp_sharded_and_the_data_parallel_learner_equal_the_one_process_update(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    cfg = load_config(overrides=_overrides(tiny_model_dir, base))
    sessions, lay = SessionCache(), RunLayout.open(cfg, "r")
    stages.init_stage(cfg, lay, sessions)
    stages.rollout_stage(cfg, lay, 0, sessions)
    stages.reward_stage(cfg, lay, 0, sessions)
    del sessions
    ray = ["pipeline.engine=ray", "train.workers=2"]
    variants = {"one": [], "dp": ray, "fsdp": [*ray, "train.sharding=fsdp"]}
    for name in variants:
        shutil.copytree(base, tmp_path / name)
    over = {name: _overrides(tiny_model_dir, tmp_path / name, *extra) for name, extra in variants.items()}
    procs = [_process(_ONE, json.dumps(over["one"]))]
    procs += [_process(_RANK, str(r), str(tmp_path / "pg"), json.dumps([over["dp"], over["fsdp"]])) for r in (0, 1)]
    held = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip().endswith("DONE"), err[-3000:]
        held += [float(line.split()[1]) for line in out.splitlines() if line.startswith("HELD")]
    # each rank holds the whole transformer under plain data parallelism, about half of it sharded
    # (FSDP2 pads a weight whose first dimension does not split evenly)
    assert held[0::2] == [1.0, 1.0] and all(0.45 < h < 0.55 for h in held[1::2]), held

    ck = {name: load_checkpoint(RunLayout.open(load_config(overrides=o), "r").store,
                                RunLayout.open(load_config(overrides=o), "r").prefix(0, "learner"))
          for name, o in over.items()}
    want, init = ck["one"], load_checkpoint(lay.store, lay.prefix(-1, "learner")).lora
    mw = want.info["metrics"]
    assert mw["train/units"] == 4 and mw["train/optimizer_steps"] == 6  # 3 minibatches x 2 epochs
    for name in ("dp", "fsdp"):
        got = ck[name]
        assert got.lora.keys() == want.lora.keys() and got.ema.keys() == want.ema.keys()
        for k in want.lora:  # a whole tensor, as one process writes it, not a rank's shard
            assert got.lora[k].shape == want.lora[k].shape and type(got.lora[k]) is torch.Tensor
            assert _relative(got.lora[k] - init[k], want.lora[k] - init[k], want.lora[k] - init[k]) < LORA_RTOL, (name, k)
            assert _relative(got.ema[k] - init[k], want.ema[k] - init[k], want.ema[k] - init[k]) < LORA_RTOL, (name, k)
        assert got.optimizer["state"].keys() == want.optimizer["state"].keys()
        for i, s_w in want.optimizer["state"].items():
            s_g = got.optimizer["state"][i]
            assert int(s_g["step"]) == int(s_w["step"]) == 6
            for moment in ("exp_avg", "exp_avg_sq"):
                assert type(s_g[moment]) is torch.Tensor and s_g[moment].shape == s_w[moment].shape
                assert _relative(s_g[moment], s_w[moment], s_w[moment]) < MOMENT_RTOL, (name, i, moment)
        mg = got.info["metrics"]
        assert mg["train/units"] == mw["train/units"] and mg["reward/mean"] == mw["reward/mean"]
        assert mg["train/loss"] == pytest.approx(mw["train/loss"], rel=1e-3, abs=1e-7)
        assert mg["train/grad_norm"] == pytest.approx(mw["train/grad_norm"], rel=1e-3)
    # the pads: each of the 4 one-unit minibatches (2 per epoch) leaves one rank without a unit,
    # which pads once; the old log-probs' pass needs none (2 micro-batches on each rank); the
    # learner's rows stay those of its units
    assert [ck[n].info["metrics"]["train/pad_calls"] for n in ("one", "dp", "fsdp")] == [0, 0, 4]
    assert ck["dp"].info["metrics"]["learner/nfe"] == ck["fsdp"].info["metrics"]["learner/nfe"] == mw["learner/nfe"]


@pytest.mark.parametrize("extra, words", [
    (["train.sharding=fsdp"], ["train.sharding=fsdp", "pipeline.engine=local", "train.workers to 2"]),
    (["train.sharding=fsdp", "pipeline.engine=ray"], ["train.workers=1"]),
    (["train.sharding=fsdp", "pipeline.engine=ray", "train.workers=2", "pipeline.placement=colocated"],
     ["pipeline.placement=separate"]),
])
def test_a_sharded_learner_without_ranks_to_shard_over_or_with_colocated_sampling_is_refused(extra, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"pipeline.store={tmp_path / 's'}", *extra])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_sharding_is_where_the_learner_runs_not_what_it_computes(tmp_path):
    """Same digest (finished stages are reused when a run turns sharding on), and 'auto' takes the
    separate placement: a colocated rank would sample alone on a sharded model."""
    from tempflow_core.run.plan import placement_on_gpus

    ray = [f"pipeline.store={tmp_path / 's'}", "pipeline.engine=ray", "train.workers=2"]
    plain, sharded = load_config(overrides=ray), load_config(overrides=[*ray, "train.sharding=fsdp"])
    assert plain.digest() == sharded.digest()
    assert placement_on_gpus(plain) == "colocated" and placement_on_gpus(sharded) == "separate"
