"""pipeline.engine=ray on CPU processes: rollout and reward actors, a Ray Train learner.

One local Ray (127.0.0.1) serves the module. What is checked:
  * rollouts do not depend on the worker count: 1 and 2 rollout actors write the same
    tensors as the local engine sampling the same slices, and 1 and 2 reward actors the same scores;
  * colocated placement (2 pretend GPUs): the learner's ranks sample, train and evaluate, the
    driver builds no model, the reward actors take no GPU;
  * a learner of 2 Ray Train ranks (gloo) ends with the LoRA and AdamW state of the one-process
    update within the stated tolerance (float summation order of the all-reduce), for plain
    trajectories and for branch points;
  * a rollout actor SIGKILLed in the middle of a stage is replaced and the stage ends with the same output;
  * a learner rank killed at any point of a stage (having taken the job, in a minibatch, entering the
    all-reduce, while rank 0 writes the checkpoint) never fails the stage: the group is started anew
    and the update ends as the one-process update; a rank that finds a damaged shard makes the stage
    heal its inputs and run again;
  * `train_flow` with engine=ray (2 rollout actors, 2 learner ranks, Prefect, MLflow) ends with the
    local run's LoRA within that tolerance;
  * the local head needs nothing of the user's home folder (its own token), and joining a cluster
    with the wrong token or none is refused before any work.

What is compared, and at which tolerance: the all-reduced gradient is a sum in another order, so
the AdamW moments (linear in the gradients) agree with the one-process update to float32
rounding; AdamW then divides each gradient by its own size, so entries near zero turn last-bit
differences into visible ones, and the LoRA after the step agrees to LORA_RTOL when the ranks
run at the torch thread count of the process they are compared with (thread counts change the
summation order of every matmul). The module fixture gives the Ray workers this process's count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from flows.children import free_port
from tempflow_core.run import stages
from tempflow_core.algorithm.checkpoint import load_checkpoint
from tempflow_core.config import load_config
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.shards import read_rollouts, read_scores, require_manifest
from tempflow_core.storage import join_key

from .conftest import tiny_overrides


# Two learner ranks against one, at matched thread counts: one update's LoRA delta agrees to this
# relative error (measured 8e-5 on these configs: AdamW divides gradients that differ in the last
# bits by their own size).
LORA_RTOL = 1e-3
# The AdamW moments, relative to their norm. After one optimizer step they are the all-reduced
# (clipped) gradient and its square: float32 rounding of a sum in another order (measured 1.2e-6).
# After two, the second gradient is taken at a first-step LoRA that already differs (measured 5e-5).
MOMENT_RTOL_ONE_STEP = 1e-5
MOMENT_RTOL = 5e-4
# After two iterations the difference has also gone through iteration 1's rollouts, sampled with the
# two slightly different LoRAs (measured 2.2e-3 on the flow test's config).
LORA_RTOL_TWO_ITERATIONS = 1e-2


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray head on 127.0.0.1 (flows.ray_head), this process connected as the driver, and
    RAY_ADDRESS naming it so that flows use it too."""
    from flows.ray_head import ray_cluster

    # the workers' torch threads: this process's (the local references run here)
    os.environ["TEMPFLOW_WORKER_THREADS"] = str(torch.get_num_threads())
    with ray_cluster(num_cpus=6, num_gpus=2) as address:  # 2 pretend GPUs: placements ask for them by name
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        try:
            yield address
        finally:
            ray.shutdown()
            del os.environ["RAY_ADDRESS"], os.environ["TEMPFLOW_WORKER_THREADS"]


def _cfg(tmp_path, model_dir, run: str, workers: int, engine: str = "ray", extra: list[str] = ()):
    return load_config(overrides=tiny_overrides(tmp_path, model_dir, iterations=1) + [
        "rollout.prompts_per_iter=4", "rollout.slices=2", "pipeline.samples_per_shard=2", "train.micro_batch=2",
        "train.lr=0.01", f"rollout.workers={workers}", f"reward.workers={workers}", f"train.workers={workers}",
        f"pipeline.engine={engine}", f"pipeline.store={tmp_path / run}", *extra])


def _iteration(cfg, run_id: str, sessions: SessionCache, engine=None, learner: bool = True) -> RunLayout:
    lay = RunLayout.open(cfg, run_id)
    stages.init_stage(cfg, lay, sessions)
    r = engine.rollout_runner(cfg, run_id, 0) if engine else None
    stages.rollout_stage(cfg, lay, 0, sessions, run_slices=r)
    stages.reward_stage(cfg, lay, 0, sessions, run_scoring=engine.reward_runner(cfg, run_id, 0) if engine else None)
    if learner:
        stages.learner_stage(cfg, lay, 0, sessions, run_ranks=engine.learner_runner(cfg, run_id, 0) if engine else None)
    return lay


@pytest.fixture(scope="module")
def local_reference(tiny_model_dir, tmp_path_factory) -> RunLayout:
    """One iteration of the tests' config on the local engine (rollout, reward, update): what the
    Ray runs of the default algorithm are compared with."""
    return _iteration(_cfg(tmp_path_factory.mktemp("local"), tiny_model_dir, "local", 1, "local"), "r", SessionCache())


def _same_rollouts(a: RunLayout, b: RunLayout) -> None:
    x, y = read_rollouts(a.store, a.prefix(0, "rollout")), read_rollouts(b.store, b.prefix(0, "rollout"))
    assert x.sample_keys() == y.sample_keys() and x.prompt_ids == y.prompt_ids
    assert torch.equal(x.embeds.embeds, y.embeds.embeds) and torch.equal(x.sigmas, y.sigmas)
    for p, q in zip(x.branch_points, y.branch_points):
        assert p.prompt_index == q.prompt_index and p.step == q.step
        for f in ("x_k", "x_next", "log_prob", "seeds"):
            assert torch.equal(getattr(p, f), getattr(q, f)), f
        assert np.array_equal(p.images, q.images)
    assert x.nfe == y.nfe


def _lora_delta_close(got: dict, want: dict, init: dict) -> float:
    worst = 0.0
    for k in want:
        delta = (want[k] - init[k]).float()
        err = float((got[k] - want[k]).float().norm() / delta.norm().clamp_min(1e-12))
        worst = max(worst, err)
    return worst


def test_rollouts_and_rewards_do_not_depend_on_the_worker_count(local_ray, local_reference, tiny_model_dir, tmp_path):
    """2 rollout actors write the tensors the local engine writes (1 actor: the killed actor's test
    below), each slice its own shards merged into one manifest; with reward.stream each written
    slice goes to one of the 2 reward actors at once, and the scores are the local engine's (scores
    in shares: the tests below). A rollout actor writes the initial adapter, gives the grid and
    evaluates the base model: the driver never asks for a model."""
    from tempflow_core.engines.ray_engine import RayEngine

    from tempflow_core.algorithm.iteration import plan_iteration
    from tempflow_core.engines.stored_run import StoredRun

    ref = local_reference
    cfg = _cfg(tmp_path, tiny_model_dir, "ray-stream", 2, extra=["reward.stream=true"])
    with RayEngine(cfg) as eng:
        run = StoredRun(cfg, RunLayout.open(cfg, "r"), _NoModel(), eng)
        run.init()  # on a rollout actor, as the grid and the base model's evaluation
        plan = plan_iteration(cfg, run.schedule(), 0)
        rollouts = run.rollout(plan)
        assert len(eng._streamed[("r", 0)]) == 2  # both slices handed to the reward actors already
        run.score(plan, rollouts)
        assert eng._streamed == {}
        base, cached = run.base_eval({})
        lay = run.layout
    assert not cached and 0.0 <= base["reward"] <= 1.0
    _same_rollouts(ref, lay)
    parts = {s.name.split("-shard-")[0] for s in require_manifest(lay.store, lay.prefix(0, "rollout")).shards}
    assert parts == {"part-000", "part-001"}
    keys = read_rollouts(ref.store, ref.prefix(0, "rollout"), images=False).sample_keys()
    a, b = (read_scores(x.store, x.iteration_prefix(0), "reward") for x in (ref, lay))
    assert np.array_equal(a.aligned(keys, "reward"), b.aligned(keys, "reward"))


class _NoModel(SessionCache):
    """The driver's sessions on Ray: asked for a model, the test fails."""

    def get(self, cfg, sharded=False):
        raise AssertionError("the driver's process built a model")


def test_colocated_ranks_sample_train_and_evaluate_and_the_driver_builds_no_model(local_ray, local_reference,
                                                                                   tiny_model_dir, tmp_path):
    """pipeline.ray_gpus=1 on a Ray with 2 pretend GPUs: the placement (auto) is colocated. The 2
    learner ranks, one GPU each, write the initial adapter, sample the rollout's slices, update and
    evaluate, with one model each, and rank 0 gives the policy's grid; the shapes reward's actors
    take no GPU; the driver never asks for a model. The rollouts and scores are the local engine's bit for bit, the update its update."""
    from tempflow_core.algorithm.iteration import plan_iteration
    from tempflow_core.engines.ray_engine import RayEngine, colocated
    from tempflow_core.engines.stored_run import StoredRun
    from tempflow_core.run.baseline import base_evaluation

    sessions, ref = SessionCache(), local_reference
    local_cfg = _cfg(tmp_path, tiny_model_dir, "local", 1, "local", [f"pipeline.store={ref.store.uri_for('')}"])
    stages.eval_stage(local_cfg, ref, 0, sessions)
    cfg = _cfg(tmp_path, tiny_model_dir, "colocated", 2, extra=["pipeline.ray_gpus=1"])
    assert colocated(cfg) and not colocated(local_cfg)
    driver = _NoModel()
    with RayEngine(cfg) as eng:
        assert eng.rollout_workers == []
        assert ray.available_resources().get("GPU") == 2  # the 2 reward actors hold none
        run = StoredRun(cfg, RunLayout.open(cfg, "r"), driver, eng)
        run.init()
        assert ray.available_resources().get("GPU", 0) == 0  # the 2 ranks hold both
        plan = plan_iteration(cfg, run.schedule(), 0)  # the grid from rank 0
        rollouts = run.rollout(plan)
        run.update(plan, rollouts, run.score(plan, rollouts))
        run.evaluate(0)
        base, cached = run.base_eval({})
        lay = run.layout
    _same_rollouts(ref, lay)
    keys = read_rollouts(ref.store, ref.prefix(0, "rollout"), images=False).sample_keys()
    a, b = (read_scores(v.store, v.iteration_prefix(0), "reward") for v in (ref, lay))
    assert np.array_equal(a.aligned(keys, "reward"), b.aligned(keys, "reward"))
    _same_update(ref, lay)
    want, got = stages.read_eval(ref, 0), stages.read_eval(lay, 0)
    assert [x["prompt"] for x in got["samples"]] == [x["prompt"] for x in want["samples"]]
    assert got["reward"] == pytest.approx(want["reward"], abs=0.02)  # of a LoRA within LORA_RTOL
    assert not cached and base == base_evaluation(local_cfg, ref.store, lambda: sessions.get(local_cfg), {})[0]


@pytest.mark.slow  # the engine is family-agnostic: the family contract suite and the collectives' tests cover what it found
def test_qwen_image_on_ray_is_the_local_engine(local_ray, tiny_qwen_dir, tmp_path):
    """The Qwen-Image family (masked conditioning, true CFG) on Ray: 2 rollout actors write the local
    engine's rollouts bit for bit, masks included, 2 reward actors its scores, and 2 learner ranks
    end with its update."""
    from tempflow_core.engines.ray_engine import RayEngine

    sessions = SessionCache()
    ref = _iteration(_cfg(tmp_path, tiny_qwen_dir, "qwen-local", 1, "local"), "q", sessions)
    cfg = _cfg(tmp_path, tiny_qwen_dir, "qwen-ray", 2)
    assert cfg.family() == "qwen-image"
    with RayEngine(cfg) as eng:
        lay = _iteration(cfg, "q", sessions, eng)
    _same_rollouts(ref, lay)
    x, y = (read_rollouts(v.store, v.prefix(0, "rollout"), images=False).embeds.tensors() for v in (ref, lay))
    assert sorted(x) == sorted(y) and "mask" in x and all(torch.equal(x[k], y[k]) for k in x)
    keys = read_rollouts(ref.store, ref.prefix(0, "rollout"), images=False).sample_keys()
    a, b = (read_scores(v.store, v.iteration_prefix(0), "reward") for v in (ref, lay))
    assert np.array_equal(a.aligned(keys, "reward"), b.aligned(keys, "reward"))
    _same_update(ref, lay)


# Where a rank dies, each once (rank 0's checkpoint write is killed in the flow test): a kill ends
# its group, and the next group runs the stage again from checkpoint i-1.
KILL_POINTS = ("learner.job/rank1", "learner.minibatch/rank0", "learner.allreduce/rank1")


def test_a_learner_rank_killed_anywhere_or_finding_a_damaged_shard_never_fails_the_stage(
        local_ray, tiny_model_dir, tmp_path, monkeypatch):
    """Plain trajectories with global std (flow_grpo) and one optimizer step, so that the AdamW
    moments are the all-reduced gradient (branch points: the other tests). One learner stage of 2
    ranks in which a rank is SIGKILLed three times (tempflow_core.failpoints): having taken the job,
    at its minibatch, entering the all-reduce; and a rollout shard was cut short after its stage.
    The survivor's errors (gloo's 'Connection closed by peer') restart the group; the rank that
    reads the cut shard reports the damage, the stage heals its inputs (the rollout resampled to the
    same bytes) and runs again on a new group; a group in which no rank dies finishes, and the
    update is the one-process update."""
    from tempflow_core import failpoints
    from tempflow_core.engines.ray_engine import RayEngine

    sessions = SessionCache()
    one_step = ["algorithm=flow_grpo", "train.minibatches=1"]
    ref = _iteration(_cfg(tmp_path, tiny_model_dir, "local", 1, "local", one_step), "r", sessions)
    cfg = _cfg(tmp_path, tiny_model_dir, "ray", 2, extra=one_step)
    markers = [tmp_path / f"killed-{i}" for i in range(len(KILL_POINTS))]
    monkeypatch.setenv(failpoints.ENV, ",".join(f"{p}={m}" for p, m in zip(KILL_POINTS, markers)))
    heal = "r/quarantine/iter-000000/rollout/01/heal.json"
    with RayEngine(cfg) as eng:
        lay = _iteration(cfg, "r", sessions, eng, learner=False)
        shard = join_key(lay.prefix(0, "rollout"), require_manifest(lay.store, lay.prefix(0, "rollout")).shards[-1].name)
        lay.store.put_bytes(shard, lay.store.get_bytes(shard)[:-1024])
        stages.learner_stage(cfg, lay, 0, sessions, run_ranks=eng.learner_runner(cfg, "r", 0))
        assert eng._groups_started >= 3  # (two kills can land in one group: a rank dies while its peer waits)
    assert all(m.exists() for m in markers)  # every kill happened
    record = json.loads(lay.store.get_bytes(heal))
    assert record["reproduced"] is True and "is corrupt" in record["reason"]
    _same_update(ref, lay, MOMENT_RTOL_ONE_STEP)


def test_what_a_surviving_rank_raises_when_a_peer_dies_restarts_the_group_and_nothing_else_does():
    from tempflow_core.algorithm.data_parallel import peer_lost

    for exc in (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                             "[127.0.0.1]:41952"),
                torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1"),
                RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv")):
        assert peer_lost(exc), exc
    try:
        try:
            raise ConnectionResetError("Connection reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("all_reduce failed") from inner
    except RuntimeError as wrapped:
        assert peer_lost(wrapped)
    for exc in (ValueError("rank 0: read samples ['a']... where the manifest lists ['b']..."),
                RuntimeError("CUDA out of memory"), KeyError("train/loss")):
        assert not peer_lost(exc), exc


def _same_update(ref: RunLayout, lay: RunLayout, moment_rtol: float = MOMENT_RTOL) -> None:
    want, got = (load_checkpoint(x.store, x.prefix(0, "learner")) for x in (ref, lay))
    init = load_checkpoint(ref.store, ref.prefix(-1, "learner")).lora
    assert want.optimizer["state"].keys() == got.optimizer["state"].keys()
    for i, s_w in want.optimizer["state"].items():
        s_g = got.optimizer["state"][i]
        assert s_w["step"] == s_g["step"]
        for moment in ("exp_avg", "exp_avg_sq"):  # linear in the gradients (and their squares)
            if not s_w[moment].any():  # LoRA A's first gradient is zero (B starts at zero): exactly
                assert not s_g[moment].any(), (i, moment)
                continue
            err = float((s_g[moment] - s_w[moment]).norm() / s_w[moment].norm())
            assert err < moment_rtol, (i, moment, err)
    assert _lora_delta_close(got.lora, want.lora, init) < LORA_RTOL
    mw, mg = want.info["metrics"], got.info["metrics"]
    assert set(mg) == set(mw)
    assert mg["train/units"] == mw["train/units"] and mg["learner/nfe"] == mw["learner/nfe"]
    assert mg["reward/mean"] == mw["reward/mean"] and mg["adv/std"] == mw["adv/std"]
    assert mg["train/loss"] == pytest.approx(mw["train/loss"], rel=1e-3, abs=1e-7)


def test_a_rollout_actor_killed_mid_stage_is_replaced_and_the_output_is_the_same(local_ray, local_reference,
                                                                                tiny_model_dir, tmp_path):
    from tempflow_core.engines.ray_engine import RayEngine

    sessions, ref = SessionCache(), local_reference
    cfg = _cfg(tmp_path, tiny_model_dir, "killed", 1)
    with RayEngine(cfg) as eng:
        actor = eng.rollout_workers[0]
        pid = ray.get(actor.pid.remote())
        lay = RunLayout.open(cfg, "r")
        stages.init_stage(cfg, lay, sessions)
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault(
            "uri", stages.rollout_stage(cfg, lay, 0, sessions, run_slices=eng.rollout_runner(cfg, "r", 0))))
        t.start()
        deadline = time.time() + 300
        # kill the actor once it is in the middle of the stage: its first slice is written, the second is not
        while not any(k.rsplit("/", 1)[-1].startswith("part-000") for k in lay.store.list(lay.prefix(0, "rollout"))):
            assert time.time() < deadline and t.is_alive()
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        t.join(300)
        assert "uri" in done
        assert ray.get(actor.pid.remote()) != pid  # a new process took the dead one's place
    _same_rollouts(ref, lay)


def _readme_ray_overrides() -> list[str]:
    """The `--set` overrides of the docs' Ray command (docs/ray.md, its first bash block), which
    the README's section "Scaling out" shows too."""
    root = Path(__file__).resolve().parents[2]
    block = (root / "docs" / "ray.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    assert "tempflow train" in block
    readme = (root / "README.md").read_text().split("## Scaling out", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert block.strip() in readme, "the README's Ray command is not the one docs/ray.md shows"
    return re.findall(r"--set (\S+)", block)


def test_train_flow_on_ray_ends_with_the_local_lora(local_ray, prefect_api, tiny_model_dir, tmp_path, quiet_env,
                                                    monkeypatch):
    """The docs' Ray command (its overrides on the tiny model), through Prefect and MLflow, with the
    learner's 2 ranks sharding the transformer (train.sharding=fsdp, tests/algorithm/test_sharding.py);
    rank 0 is SIGKILLed while it writes iteration 0's checkpoint (after the ranks gathered the
    state, before the checkpoint), the group starts anew and shards again, and the run still ends
    with the local run's LoRA."""
    from flows.train import train_flow
    from tempflow_core import failpoints

    ray_overrides = _readme_ray_overrides()
    assert "pipeline.engine=ray" in ray_overrides and "train.workers=2" in ray_overrides
    cfgs = {e: load_config(overrides=tiny_overrides(tmp_path / e, tiny_model_dir) + [
        "rollout.prompts_per_iter=4", "pipeline.samples_per_shard=2", "train.micro_batch=2", *ray_overrides,
        f"pipeline.engine={e}", *(["train.sharding=fsdp"] if e == "ray" else [])]) for e in ("local", "ray")}
    killed = tmp_path / "killed-writing-the-checkpoint"
    for e, cfg in cfgs.items():
        if e == "ray":  # never in this process: the local engine writes checkpoints here
            monkeypatch.setenv(failpoints.ENV, f"learner.checkpoint/rank0={killed}")
        train_flow(config=cfg, run_id=f"run-{e}")
    assert killed.exists()
    lays = {e: RunLayout.open(c, f"run-{e}") for e, c in cfgs.items()}
    _same_update(lays["local"], lays["ray"])  # iteration 0: LoRA, AdamW state and metrics
    # the ranks' shares are uneven: the sharded ranks padded to stay in step (only sharding pads)
    assert load_checkpoint(lays["ray"].store, lays["ray"].prefix(0, "learner")).info["metrics"]["train/pad_calls"] > 0
    init = load_checkpoint(lays["local"].store, lays["local"].prefix(-1, "learner")).lora
    want, got = (load_checkpoint(lays[e].store, lays[e].prefix(1, "learner")).lora for e in ("local", "ray"))
    assert _lora_delta_close(got, want, init) < LORA_RTOL_TWO_ITERATIONS
    # the same stage layout on the store: an engine decides where work runs, not what is written
    r = lays["ray"]
    assert all(r.complete(i, s) for i in (0, 1) for s in ("rollout", "reward", "learner"))
    assert r.complete(1, "eval")
    assert {s.name.split("-shard-")[0] for s in require_manifest(r.store, r.prefix(1, "rollout")).shards} == {
        f"part-{j:03d}" for j in range(cfgs["ray"].rollout.slices)}


def _stat(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ...), None once it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    out = []
    for d in os.listdir("/proc"):
        st = _stat(d) if d.isdigit() else None
        if st and st[0] != "Z" and int(st[2]) == pgid:
            out.append(int(d))
    return out


def _head_leader(port: int) -> int:
    """The `ray start --head --port=<port>` process: the leader of the head's process group (its
    watchdog, flows/children.py, leads a group of its own with the same arguments: not that one)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline").read().replace("\0", " ")
            except OSError:
                continue
            st = _stat(d)
            if f"--port={port}" in cmd and "children.py" not in cmd and st and int(st[2]) == int(d):
                return int(d)
    raise AssertionError(f"no process group leads the Ray head on port {port}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process groups from /proc")
def test_a_local_ray_head_listens_on_loopback_only_and_dies_with_a_killed_run(tmp_path):
    import subprocess
    import sys

    code = ("import time\nfrom flows.ray_head import ray_cluster\n"
            "with ray_cluster(2) as a:\n    print(a, flush=True)\n    time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[2])
    try:
        address = run.stdout.readline().strip()
        port = int(address.rsplit(":", 1)[1])
        leader = _head_leader(port)
        def listening() -> list[str]:
            lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
            return [ln for ln in lines if any(f"pid={p}," in ln for p in _group_members(leader))]

        deadline = time.time() + 60
        while len({ln.split('"')[1] for ln in listening()}) < 3 and time.time() < deadline:  # GCS, raylet, agents
            time.sleep(0.5)
        mine = listening()
        assert len({ln.split('"')[1] for ln in mine}) >= 3, mine
        loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
        assert all(ln.split()[3].startswith(loopback) for ln in mine), mine
    finally:
        run.kill()  # SIGKILL: no atexit, no finally in the run
        run.wait()
    deadline = time.time() + 60
    while _group_members(leader) and time.time() < deadline:
        time.sleep(0.5)
    assert _group_members(leader) == []


_HEAD = """
import os, sys
import ray
from flows.ray_head import ray_cluster
with ray_cluster(1) as address:
    path = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(address, path, oct(os.stat(path).st_mode & 0o777), oct(os.stat(os.path.dirname(path)).st_mode & 0o777),
          flush=True)
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    print(ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
    ray.shutdown()
    sys.stdin.readline()  # the test uses the head meanwhile
print(os.path.exists(path), "RAY_AUTH_TOKEN_PATH" in os.environ, flush=True)
"""


def _without_ray_auth(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "TEMPFLOW_"))}


def test_a_local_head_needs_nothing_of_the_home_folder_and_joining_it_needs_its_token(tmp_path, monkeypatch):
    """A machine that never ran Ray: empty HOME, no RAY_AUTH_* variables. The head makes its own
    token (a 0600 file in a 0700 folder, deleted with the head, HOME left empty); a driver without
    that token, or with another one, is refused before any work, naming RAY_AUTH_TOKEN, also by
    `tempflow train` (exit 2, nothing written); with the token it joins."""
    import subprocess
    import sys

    from flows.ray_head import RayAccessError, check_access

    home = tmp_path / "home"
    home.mkdir()
    env = {**_without_ray_auth(dict(os.environ)), "HOME": str(home)}
    checkout = Path(__file__).resolve().parents[2]
    head = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=checkout)
    try:
        address, token_path, file_mode, folder_mode = head.stdout.readline().split()
        assert (file_mode, folder_mode) == ("0o600", "0o700")
        assert head.stdout.readline().strip() == "42"  # the driver that has the token works
        token = Path(token_path).read_text().strip()
        assert len(token) >= 32

        for k in [k for k in os.environ if k.startswith("RAY_AUTH")]:
            monkeypatch.delenv(k)
        with pytest.raises(RayAccessError, match="requires a token.*RAY_AUTH_TOKEN"):
            check_access(address)
        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
        with pytest.raises(RayAccessError, match="refused the token.*RAY_AUTH_TOKEN"):
            check_access(address)
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        check_access(address)  # the user's token for this cluster

        state = tmp_path / "state"
        cli = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--set", "pipeline.engine=ray"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**env, "RAY_ADDRESS": address, "TEMPFLOW_HOME": str(state)})
        assert cli.returncode == 2, cli.stderr[-2000:]
        assert cli.stderr.strip().count("\n") == 0 and "RAY_ADDRESS" in cli.stderr and "RAY_AUTH_TOKEN" in cli.stderr
        assert token not in cli.stdout + cli.stderr
        assert not state.exists()
        with pytest.raises(RayAccessError, match="no Ray cluster answers"):
            check_access(f"127.0.0.1:{free_port()}")
    finally:
        out, _ = head.communicate("\n", timeout=120)
    assert out.split() == ["False", "False"]  # the token file is gone, the variable restored
    assert not os.path.exists(os.path.dirname(token_path))
    assert list(home.iterdir()) == []
