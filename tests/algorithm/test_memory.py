"""The memory estimate (tempflow_core/memory.py) against what runs hold: on the CPU, the peaks
that LiveBytes measures around the real rollout and learner update of tiny models at several
batch sizes and options; on a GPU, the peaks the H200 smoke records measured for SD3.5-M."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tempflow_core.algorithm.learner import build_units, update
from tempflow_core.algorithm.rollout import branched_rollout
from tempflow_core.algorithm.session import setup
from tempflow_core.algorithm.steps import step_pool
from tempflow_core.config import load_config
from tempflow_core.memory import GIB, LiveBytes, estimate, load_facts, plan_memory, probe
from tempflow_core.run import plan

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "results" / "gpu" / "smoke"
MADE_BEFORE = ("weights", "text encoders", "lora")  # allocated before the measured calls: LiveBytes does not see them
# estimate / measured on the CPU: the activations are probed at batch 1 and 2 and the rest is
# arithmetic (measured 0.95-1.13)
CPU_TOLERANCE = (0.9, 1.2)


def test_live_bytes_counts_what_ops_make_until_it_is_freed_and_not_views():
    before = torch.ones(1024, 256)  # made before: never counted, nor views of it
    with LiveBytes() as m:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 2 MiB live
        view = b[:10].t()
        del a
        c = b + before.t().t()  # 2 MiB live again
        del b, view
        c.add_(1)  # in place: nothing new
    assert m.peak == 2 * 2**20 and m.live == 2**20


CASES = [  # tiny SD3 base (64 px), T 4, LoRA r 8: prompts, K, max_batch, micro_batch, extra
    (2, 4, 8, 2, []),
    (4, 4, 32, 8, []),
    (4, 4, 32, 8, ["train.gradient_checkpointing=true"]),
    (4, 8, 16, 4, ["model.dtype=bfloat16"]),
    (4, 4, 16, 4, ["rollout.decode_chunk=8"]),
]


@pytest.mark.parametrize("prompts,K,max_batch,micro,extra", CASES)
def test_the_estimate_matches_the_peaks_of_a_real_rollout_and_update_on_the_cpu(prompts, K, max_batch, micro, extra):
    _estimate_against_a_real_run("models/tiny-shapes-sd3", prompts, K, max_batch, micro, extra)


@pytest.mark.parametrize("folder,extra", [("tiny_qwen_dir", []),  # masked text, true CFG, a 3-D VAE
                                          ("tiny_wan_dir", ["model.num_frames=9"])])  # clips: a frame axis
def test_the_estimate_holds_for_the_families_unlike_sd3(request, folder, extra):
    """The same check on the tiny Qwen-Image and Wan models: the probe feeds each policy its own
    conditioning and latent shape and decodes through its own VAE."""
    _estimate_against_a_real_run(request.getfixturevalue(folder), 2, 4, 8, 4, extra)


def _estimate_against_a_real_run(model, prompts, K, max_batch, micro, extra):
    cfg = load_config(overrides=[
        f"model.path={model}", "model.device=cpu", "prompts.source=builtin:colors", "lora.rank=8",
        "lora.alpha=16", "sampling.num_steps=4", f"rollout.prompts_per_iter={prompts}", f"rollout.group_size={K}",
        f"rollout.max_batch={max_batch}", f"train.micro_batch={micro}", *extra])
    est = plan_memory(cfg, gpu=False)
    s = setup(cfg)
    steps = step_pool("all", cfg.sampling.num_steps)
    with LiveBytes() as m:
        batch = branched_rollout(s.policy, ["a red cube"] * prompts, [f"p{i}" for i in range(prompts)], s.schedule,
                                 steps, K, cfg.guidance_scale(), 0, max_batch)
    rollout = m.peak
    units = build_units(batch, np.linspace(-1, 1, len(batch.sample_keys()), dtype=np.float32), {k: 1.0 for k in steps})
    with LiveBytes() as m:
        update(s.policy, s.optimizer, units, batch.embeds, s.schedule, cfg.guidance_scale(), cfg.train, cfg.loss,
               torch.Generator().manual_seed(0))
    learner = m.peak
    got = {"rollout": max(sum(v for k, v in p.items() if k not in MADE_BEFORE) for p in est["rollout"].phases.values()),
           "learner": sum(v for k, v in est["learner"].phases["update"].items() if k not in MADE_BEFORE)}
    for stage, measured in (("rollout", rollout), ("learner", learner)):
        assert CPU_TOLERANCE[0] <= got[stage] / measured <= CPU_TOLERANCE[1], (stage, got[stage], measured)


@pytest.fixture(scope="module")
def sd35m():
    """SD3.5-M's facts (its real configs) and its per-sample activations, probed in bf16 on the CPU."""
    cfg = load_config(ROOT / "flows" / "configs" / "models" / "sd35m.yaml",
                      [f"model.path={ROOT / 'tests' / 'flux' / 'fixtures' / 'sd35m'}"])
    facts, pipe = load_facts(cfg)
    return facts, probe(pipe, cfg.lora, "bfloat16", facts.pixels, cfg.model.max_sequence_length, 4.5)


@pytest.mark.parametrize("record", ["sd35m_mb2", "sd35m_mb8", "sd35m_mb8_checkpointing"])
def test_the_gpu_estimate_is_within_15_percent_above_what_one_h200_measured(sd35m, record):
    """benchmarks/gpu_smoke.py on one H200 (no text encoders; max_batch 64, decode chunk 64, T 10,
    K 6, branch points 0..8): the estimate's peaks against torch.cuda.max_memory_allocated."""
    facts, sample = sd35m
    r = json.loads((SMOKE / f"{record}.json").read_text())
    mb = {"sd35m_mb2": 2}.get(record, 8)
    cfg = load_config(ROOT / "flows" / "configs" / "models" / "sd35m.yaml", [
        f"model.path={ROOT / 'tests' / 'flux' / 'fixtures' / 'sd35m'}", f"rollout.prompts_per_iter={r['prompts']}",
        f"rollout.group_size={r['group_size']}", "rollout.max_batch=64", "rollout.decode_chunk=64", f"train.micro_batch={mb}",
        f"train.gradient_checkpointing={str('checkpointing' in record).lower()}"])
    est = estimate(cfg, facts, sample)
    for stage in ("rollout", "learner"):
        phases = [{k: v for k, v in p.items() if k != "text encoders"} for name, p in est[stage].phases.items()
                  if name != "encode prompts"]  # the smoke test has no text encoders
        peak = max(sum(p.values()) for p in phases) / GIB
        assert 0.95 <= peak / r[f"{stage}_peak_gib"] <= 1.15, (stage, peak, r[f"{stage}_peak_gib"])


def test_the_minutes_come_from_the_h200_records():
    mb8 = json.loads((SMOKE / "sd35m_mb8.json").read_text())
    ck = json.loads((SMOKE / "sd35m_mb8_checkpointing.json").read_text())
    assert plan.H200_S_PER_NFE == mb8["rollout_s"] / mb8["rollout_nfe"]
    assert plan.H200_S_PER_UNIT == mb8["learner_s"] / mb8["learner_units"]
    assert plan.H200_S_PER_UNIT_CHECKPOINTED == pytest.approx(ck["learner_s"] / ck["learner_units"], rel=1e-3)
    assert plan.SD35M_WORK == mb8["transformer_params"] // mb8["transformer_params"] * 2_243_171_520 * (1024 + 333)


def test_rows_per_iteration_by_hand():
    """T 10, all branch points (0..8), K 24, 48 prompts: the backbone takes 9 NFEs to step 8,
    the children of step k take 9 - k ODE steps: 24 x (9 + 8 + ... + 1) = 1080 per prompt."""
    cfg = load_config(overrides=["rollout.prompts_per_iter=48", "rollout.group_size=24", "sampling.num_steps=10"])
    assert plan.rows_per_iteration(cfg) == (48 * (9 + 1080), 48 * 9)
    flat = load_config(overrides=["algorithm=flow_grpo_fixed", "rollout.prompts_per_iter=3", "rollout.group_size=4"])
    assert plan.rows_per_iteration(flat) == (3 * 4 * 10, 3 * 4 * 9)


def test_the_cost_settings_rows_by_hand_and_the_presets_share_of_a_run():
    """`tempflow plan --settings` at the paper's batch (T 10, K 24, 48 prompts): each setting's rows
    worked out by hand, and `--preset fast`'s share of the run's minutes from the per-row costs."""
    from tempflow_core.memory import ModelFacts

    T, K, B = 10, 24, 48
    cfg = load_config(overrides=[f"sampling.num_steps={T}", f"rollout.group_size={K}", f"rollout.prompts_per_iter={B}",
                                 "train.iterations=8", "model.dtype=bfloat16"])
    facts = ModelFacts({"transformer": 2_243_171_520}, 1, (16, 64, 64), 512, 1357)  # SD3.5-M's work: measured rows
    got = {c.label.split(" (")[0]: c for c in plan.setting_costs(cfg, facts)}
    rows = {k: (c.nfe, c.units) for k, c in got.items()}
    # every branch point: T-1 backbone steps + K children finishing 9+8+...+1 steps
    assert rows["this config"] == (B * (9 + K * 45), B * 9)
    # 3 of the 9 steps drawn uniformly: E[max] + 1 = 3 * 10 / 4 = 7.5 backbone steps, 3 * E[9 - k] = 15 child steps
    nfe, units = rows["rollout.branch_steps=3"]
    assert nfe == pytest.approx(B * (7.5 + K * 15), rel=0.02) and units == B * 3
    # stride 2: children from step k visit range(k+1, 10, 2) + [10]
    assert rows["rollout.completion_stride=2"][0] == B * (9 + K * sum(len(range(k + 1, 10, 2)) for k in range(9)))
    assert rows["rollout.branch_steps=[0]"] == (B * (1 + K * 9), B)  # one backbone step, K children of 9 steps
    # the four noisiest steps: four backbone steps, K children of 9 + 8 + 7 + 6 steps
    assert rows["`--preset fast`"] == (B * (4 + K * 30), B * 4) and got["`--preset fast`"].iterations == 4
    assert rows["algorithm=flow_grpo_fixed"] == (B * K * T, B * K * 9)
    assert got["sampling.guidance_scale=1"].rows == B * (9 + K * 45) + 2 * B * 9  # one row per call without CFG
    # half the iterations at (34,752 c_f + 192 c_u) / (52,272 c_f + 432 c_u) each
    c_f, c_u = plan.H200_S_PER_NFE, plan.H200_S_PER_UNIT
    share = 0.5 * (B * (4 + K * 30) * c_f + B * 4 * c_u) / (B * (9 + K * 45) * c_f + B * 9 * c_u)
    fast, mine = got["`--preset fast`"], got["this config"]
    assert fast.minutes.total * 4 / (mine.minutes.total * 8) == pytest.approx(share, rel=1e-9)
    assert mine.minutes.measured and round(share, 2) == 0.33
    flat = plan.setting_costs(load_config(overrides=["algorithm=flow_grpo_fixed"]), facts)
    refused = {c[0].split(" (")[0]: c[1] for c in flat if isinstance(c, tuple)}
    assert refused["rollout.branch_steps=[0]"] == "algorithm 'flow_grpo_fixed' does not branch"
    assert "does not branch" in refused["`--preset fast`"] and "does not branch" in refused["rollout.completion_stride=2"]
    assert "sampling.guidance_scale=1" not in refused  # what applies to plain trajectories is costed


def test_tempflow_plan_prints_every_stage_and_refuses_a_run_that_does_not_fit_in_one_line(tmp_path):
    cli = [sys.executable, "-m", "flows.cli", "plan", "--set", "model.path=null", "--set", "sampling.num_steps=4"]
    env = {"TEMPFLOW_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cli + ["--settings"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| `--preset fast` | not for this config: preset 'fast' branches at steps [0, 1, 2, 3], and " \
           "sampling.num_steps 4" in out.stdout  # the settings table, a preset that does not apply named
    assert re.search(r"\| rollout.completion_stride=2 \| [\d,]+ \| [\d,]+ \|", out.stdout)
    for needle in ("rollout", "learner", "eval", "per worker", "rows per iteration", "one H200", "one H100"):
        assert needle in out.stdout, needle
    out = subprocess.run(cli + ["--set", "train.micro_batch=64", "--gpu-memory", "0.01"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert "stage needs" in line and "fix:" in line and "0.01 GiB GPU" in line, line
    assert not (tmp_path / "home").exists()  # nothing written


def test_the_memory_settings_change_where_tensors_live_not_what_is_computed(tiny_model_dir, tmp_path):
    """rollout.children_on_host, rollout.decode_chunk and model.offload_text_encoders: the same
    rollout, bit for bit, and the same config digest (except decode_chunk, part of it as max_batch)."""
    base = [f"model.path={tiny_model_dir}", "model.device=cpu", "rollout.prompts_per_iter=2", "rollout.group_size=3",
            "sampling.num_steps=3", "lora.rank=4", "lora.alpha=8", "prompts.source=builtin:colors"]

    def sample(extra: list[str]):
        cfg = load_config(overrides=base + extra)
        s = setup(cfg, tmp_path / "tok")
        b = branched_rollout(s.policy, ["a red cube", "a blue ball"], ["p0", "p1"], s.schedule, [0, 1], 3,
                             cfg.guidance_scale(), 0, cfg.rollout.max_batch,
                             children_on_host=cfg.rollout.children_on_host)
        return cfg, b

    ref_cfg, ref = sample([])
    for extra in (["rollout.children_on_host=true"], ["rollout.decode_chunk=2"], ["model.offload_text_encoders=true"]):
        cfg, got = sample(extra)
        assert np.array_equal(got.images(), ref.images()), extra
        for p, q in zip(got.branch_points, ref.branch_points):
            assert torch.equal(p.x_k, q.x_k) and torch.equal(p.x_next, q.x_next) and torch.equal(p.log_prob, q.log_prob)
        assert (cfg.digest() == ref_cfg.digest()) == ("rollout.decode_chunk=2" not in extra), extra


def test_a_run_that_does_not_fit_its_gpu_is_refused_before_any_work_and_the_cpu_is_not_checked(monkeypatch):
    """On the CPU (this machine) nothing is checked; with a GPU of 1 MiB (torch.cuda stood in for:
    none runs here) the check names the stage and the setting to change."""
    cfg = load_config(overrides=["model.path=models/tiny-shapes-sd3", "sampling.num_steps=4"])
    assert plan.device_refusal(cfg) is None  # no GPU here
    props = type("Props", (), {"total_memory": 2**20})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a 1 MiB GPU")
    torch.manual_seed(7)
    why = plan.device_refusal(cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "cuda"})}))
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))  # the check's probe leaves the run's RNG as it was
    assert why.startswith("model.device: rollout stage needs") and "a 1 MiB GPU (cuda)" in why and "fix:" in why
    assert "\n" not in why
    ray = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"engine": "ray"})})
    assert plan.device_refusal(ray) is None  # the driver does not see its workers' GPUs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_bytes_match_the_shards_a_rollout_writes(tmp_path, dtype):
    """The embedded default's rollout (4 prompts x K 4, branch points 0..4) written as shards: the
    learner inputs' bytes are the arithmetic's plus the safetensors headers; the PNGs stay under
    the raw pixels."""
    import tarfile

    from tempflow_core.algorithm.iteration import plan_iteration
    from tempflow_core.algorithm.train import run_rollout
    from tempflow_core.shards import write_rollouts
    from tempflow_core.storage import open_store

    cfg = load_config(ROOT / "flows" / "configs" / "default.yaml",
                      [f"model.path={ROOT / 'models' / 'tiny-shapes-sd3'}", "model.device=cpu", f"model.dtype={dtype}"])
    s = setup(cfg)
    batch = run_rollout(s, s.stream.next_batch(cfg.rollout.prompts_per_iter), plan_iteration(cfg, s.schedule, 0))
    write_rollouts(batch, open_store(str(tmp_path)), "r/iter-000000/rollout")
    sizes = {".safetensors": 0, ".png": 0}
    for shard in tmp_path.rglob("*.tar"):
        with tarfile.open(shard) as t:
            for m in t.getmembers():
                for ext in sizes:
                    sizes[ext] += m.size if m.name.endswith(ext) else 0
    facts, _ = load_facts(cfg)
    tensors, images = plan.store_bytes(cfg, facts)
    headers = len(batch.branch_points) * 400  # the safetensors JSON header of each sample
    assert tensors <= sizes[".safetensors"] <= tensors + headers, (tensors, sizes)
    assert 0 < sizes[".png"] <= images * 1.01  # PNG: stored or deflated, never much above raw
    if dtype == "bfloat16":  # the learner's inputs kept in the model's half precision
        assert all(bp.x_k.dtype == bp.x_next.dtype == torch.bfloat16 for bp in batch.branch_points)


def test_a_sharded_learner_holds_its_share_of_the_transformer_and_two_whole_blocks(sd35m):
    """train.sharding=fsdp over 8 ranks: SD3.5-M's transformer and the adapter's training state
    divided by 8, plus the two largest blocks FSDP holds gathered; the block counted here from the
    parameter names (transformer_blocks.<i>.), independently of the estimate's module walk."""
    facts, sample = sd35m
    over = [f"model.path={ROOT / 'tests' / 'flux' / 'fixtures' / 'sd35m'}", "pipeline.engine=ray", "train.workers=8"]
    path = ROOT / "flows" / "configs" / "models" / "sd35m.yaml"
    plain, sharded = (estimate(load_config(path, over + extra), facts, sample)["learner"].phases["update"]
                      for extra in ([], ["train.sharding=fsdp"]))
    _, pipe = load_facts(load_config(path, over))
    per_block: dict[str, int] = {}
    for name, p in pipe.transformer.named_parameters():
        if name.startswith("transformer_blocks."):
            block = name.split(".")[1]
            per_block[block] = per_block.get(block, 0) + p.numel()
    transformer = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" not in n) * 2  # bf16
    assert facts.block_params == max(per_block.values()) and len(per_block) == 24
    assert sharded["weights"] == pytest.approx(plain["weights"] - transformer * 7 / 8 + 2 * 2 * max(per_block.values()))
    assert sharded["lora + grad + AdamW"] == pytest.approx(plain["lora + grad + AdamW"] / 8)
    assert sharded["activations"] == plain["activations"] and sharded["units"] == plain["units"]
