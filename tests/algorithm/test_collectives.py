"""The learner's collectives under the GPU's rule: NCCL takes tensors on the rank's CUDA device
only. On a CPU, a process group whose device map has no CPU backend (`cuda:gloo`) enforces the
same rule (`No backend type associated with device type cpu`), so the learner's ranks are run
under one here; every collective also checks its tensor against the group's device itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tempflow_core.algorithm.data_parallel import CollectiveError, collective_device
from tempflow_core.algorithm.data_parallel import peer_lost

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config, params, want", [
    ("nccl", "cuda:3", "cuda:3"),  # Ray Train's GPU group: the rank's own device
    ("cuda:nccl", "cuda:0", "cuda:0"),
    ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("gloo", "cpu", "cpu"),  # the CPU group
    ("cpu:gloo,cuda:gloo", "cpu", "cpu"),
])
def test_the_collective_device_is_the_ranks_device_where_the_group_has_a_backend_for_it(config, params, want):
    assert collective_device(config, torch.device(params)) == torch.device(want)


@pytest.mark.parametrize("config", ["nccl", "cuda:nccl", "cuda:gloo"])
def test_a_group_without_a_backend_for_the_lora_device_is_refused_in_one_line(config):
    with pytest.raises(CollectiveError) as e:
        collective_device(config, torch.device("cpu"))
    text = str(e.value)
    assert "\n" not in text and "model.device" in text and "cpu" in text and config in text
    assert not peer_lost(e.value)  # the group's text names a backend, yet it is no lost peer: no retry


def _run(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_reduce_and_gradients_go_through_the_group_on_its_device_and_a_tensor_elsewhere_is_refused(tmp_path):
    """One real gloo rank: the statistics' sum, min and max come back exact from tensors on the
    group's device; gradients on another device than the group's are refused before the collective."""
    out = _run(f"""
        import torch, torch.distributed as dist
        from tempflow_core.algorithm.data_parallel import CollectiveError, DataParallel
        dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "pg")!r}, 1), rank=0, world_size=1)
        dp = DataParallel(0, 1, 3, torch.tensor([0, 1, 2]), torch.device("cpu"))
        assert dp.reduce([1.5, 2.0]) == [1.5, 2.0] and dp.reduce([0.25], "min") == [0.25]
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
        dp.all_reduce_grads([p]); assert torch.equal(p.grad, torch.full((3,), 2.0))
        # a parameter no rank has a gradient for keeps none (AdamW then leaves it alone, as in one process)
        q = torch.nn.Parameter(torch.ones(2))
        dp.all_reduce_grads([q, p]); assert q.grad is None and torch.equal(p.grad, torch.full((3,), 2.0))
        # a group whose device is another than the LoRA's (meta stands in for cuda: no data, a device of its own)
        off = DataParallel(0, 1, 3, torch.tensor([0, 1, 2]), torch.device("meta"))
        seen = []
        class Stop(Exception):
            pass
        def spy(t, op=None):
            seen.append(str(t.device))
            raise Stop
        dist.all_reduce = spy
        for call in (lambda: off.all_reduce_grads([p]), lambda: off.reduce([1.0])):
            try:
                call()
            except CollectiveError as e:
                print("REFUSED", e)
            except Stop:
                print("REACHED", seen[-1])
        dist.destroy_process_group()
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("REFUSED", "REACHED"))]
    # gradients on the CPU never reach the group's collective; the statistics are built on its device
    assert lines[0] == ("REFUSED learner rank 0: the LoRA gradients are on cpu where the process group's collectives "
                        "take meta tensors; fix: keep the LoRA on the rank's device"), lines
    assert lines[1] == "REACHED meta", lines


def test_a_learner_rank_under_a_group_with_no_cpu_backend_names_the_cause_before_any_update(
        tiny_model_dir, tmp_path):
    """The learner's rank under `cuda:gloo` (NCCL's rule: no CPU tensors) with its LoRA on the CPU:
    refused at once in one line, not after a whole update with torch's 'No backend type
    associated with device type cpu' (what the statistics' CPU all-reduce raised under NCCL)."""
    from tempflow_core.algorithm.session import SessionCache
    from tempflow_core.config import load_config
    from tempflow_core.run import stages
    from tempflow_core.run.layout import RunLayout

    cfg = load_config(overrides=[
        f"model.path={tiny_model_dir}", "train.iterations=1", "rollout.prompts_per_iter=2", "rollout.group_size=3",
        "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3", "model.device=cpu", f"pipeline.store={tmp_path / 's'}",
        f"output_dir={tmp_path / 'runs'}", "prompts.source=builtin:colors"])
    sessions = SessionCache()
    lay = RunLayout.open(cfg, "r")
    stages.init_stage(cfg, lay, sessions)
    stages.rollout_stage(cfg, lay, 0, sessions)
    stages.reward_stage(cfg, lay, 0, sessions)
    out = _run(f"""
        import json, time, torch.distributed as dist
        from tempflow_core.algorithm.data_parallel import CollectiveError
        from tempflow_core.algorithm.session import SessionCache
        from tempflow_core.config import RunConfig
        from tempflow_core.run import stages
        from tempflow_core.run.layout import RunLayout
        from tempflow_core.algorithm import learner
        calls = []
        real = learner.evaluate_units
        learner.evaluate_units = lambda *a, **k: calls.append(1) or real(*a, **k)
        cfg = RunConfig.model_validate(json.loads({json.dumps(cfg.model_dump(mode="json"))!r}))
        dist.init_process_group("cuda:gloo", store=dist.FileStore({str(tmp_path / "pg")!r}, 1), rank=0, world_size=1)
        try:
            stages.learner_rank(cfg, RunLayout.open(cfg, "r"), 0, SessionCache(), 0, 1)
            print("FINISHED")
        except CollectiveError as e:
            print("REFUSED", len(calls), e)
        except Exception as e:
            print("OTHER", len(calls), type(e).__name__, " ".join(str(e).split())[:300])
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("REFUSED 0 "), last  # no unit evaluated before the refusal
    assert "cuda:gloo" in last and "model.device" in last
