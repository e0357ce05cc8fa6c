"""pipeline.engine=ray on two Ray nodes that share nothing but the store.

The head (flows.ray_head, with its own token) and a second node started by `ray start --address`
from a folder of its own, where none of the driver's relative paths exist, both on 127.0.0.1.
The store is S3 (the tests' moto server) and the model an absolute path. Checked:
  * rollout and reward actors and the learner's ranks land on both nodes (their node ids);
  * the iteration equals the local engine's (rollout tensors bit for bit, the update within the
    tolerance of tests/pipeline/test_ray_engine.py);
  * the second node SIGKILLed in the middle of a rollout stage: its actors come back on the head
    and the stage ends with the same output, and the rest of the iteration too;
  * a path that the second node cannot see (relative to the driver's folder) is refused before
    any actor starts, naming the setting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from flows.children import spawn, stop
from tempflow_core.run import stages
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.preflight import PreflightError
from tempflow_core.algorithm.session import SessionCache

from .test_children import _descendants
from .test_ray_engine import _cfg, _iteration, _same_rollouts, _same_update


# `ray start` of a worker node, all on 127.0.0.1: Ray's single-machine mode (LOCAL_ONLY) refuses
# to start a worker node, and outside it Ray rewrites a loopback --address to the machine's own
# network address; this keeps the address as given (the node's IP is --node-ip-address=127.0.0.1).
_LOOPBACK_WORKER_NODE = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                         "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def _kill_tree(root: int) -> None:
    """SIGKILL every descendant of `root` (the node's `ray start` and all it started: raylet, agents,
    workers, in whatever process groups they made), leaving `root` itself."""
    found = _descendants(root)
    assert found, f"{root} has no descendants"
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive_nodes() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


@pytest.fixture
def two_nodes(tmp_path, s3_server):
    """(address, the second node's watchdog, its folder): a local head of 6 CPUs (room for all six
    actors and ranks once the second node is gone) and a second node of 3 CPUs, this process
    connected as the driver."""
    from flows.ray_head import LOCAL_ONLY, ray_cluster

    folder = tmp_path / "node2"
    folder.mkdir()
    with ray_cluster(num_cpus=6) as address:  # inside: RAY_AUTH_TOKEN_PATH names the head's token
        node = spawn([sys.executable, "-c", _LOOPBACK_WORKER_NODE, "start", f"--address={address}", "--num-cpus=3",
                      "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--block"], grace=0.0, cwd=folder,
                     env={**os.environ, **LOCAL_ONLY, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            deadline = time.time() + 120
            while len(_alive_nodes()) < 2:
                assert time.time() < deadline and node.poll() is None, "the second node did not join"
                time.sleep(0.5)
            yield address, node, folder
        finally:
            ray.shutdown()
            stop(node, timeout=30)


def test_two_nodes_share_the_work_and_survive_the_loss_of_one(two_nodes, tiny_model_dir, tmp_path, s3_server,
                                                              monkeypatch):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tempflow_core.engines.ray_engine import RayEngine

    address, node, folder = two_nodes
    head = ray.get_runtime_context().get_node_id()
    other = next(n for n in _alive_nodes() if n != head)

    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False))
    def cwd() -> str:
        return os.getcwd()

    assert Path(ray.get(cwd.remote())) == folder  # the second node works in a folder of its own

    store = f"s3://tempflow-test/two-nodes-{uuid.uuid4().hex[:8]}"
    s3 = [f"pipeline.s3_endpoint_url={s3_server}"]
    assert Path(tiny_model_dir).is_absolute()
    sessions = SessionCache()
    ref = _iteration(_cfg(tmp_path, tiny_model_dir, "local", 1, "local"), "r", sessions)
    cfg = _cfg(tmp_path, tiny_model_dir, "ray", 2, extra=[f"pipeline.store={store}", *s3])

    with RayEngine(cfg) as eng:
        lay = _iteration(cfg, "r", sessions, eng)
        placed = {"rollout": set(ray.get([a.node.remote() for a in eng.rollout_workers])),
                  "reward": set(ray.get([a.node.remote() for a in eng.reward_workers])),
                  "learner": set(eng.rank_nodes.values())}
        assert all(nodes == {head, other} for nodes in placed.values()), placed
    _same_rollouts(ref, lay)
    _same_update(ref, lay)

    # a path the second node cannot see is refused before any actor starts, naming the setting
    checkout = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(checkout)  # here the relative path names the shipped model; not in the node's folder
    relative = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "models/tiny-shapes-sd3"})})
    with pytest.raises(PreflightError, match=r"^model\.path: 'models/tiny-shapes-sd3' is not there on Ray node"):
        RayEngine(relative)
    local_store = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"store": str(tmp_path / "x")})})
    (tmp_path / "x").mkdir()
    shared = RayEngine(local_store)  # an absolute folder the node sees (one machine: it is shared)
    shared.close()
    with pytest.raises(PreflightError, match=r"^pipeline\.store: 'store' is not there on Ray node"):
        RayEngine(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"store": "store"})}))

    # the second node dies in the middle of a rollout stage
    with RayEngine(cfg) as eng:
        lay = RunLayout.open(cfg, "killed")
        stages.init_stage(cfg, lay, sessions)
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault(
            "uri", stages.rollout_stage(cfg, lay, 0, sessions, run_slices=eng.rollout_runner(cfg, "killed", 0))))
        t.start()
        deadline = time.time() + 300
        while not any(k.rsplit("/", 1)[-1].startswith("part-") for k in lay.store.list(lay.prefix(0, "rollout"))):
            assert time.time() < deadline and t.is_alive()
            time.sleep(0.05)
        _kill_tree(node.pid)  # the node dies: raylet, its workers and actors, at once
        t.join(600)
        assert "uri" in done
        deadline = time.time() + 180
        while True:  # Ray sees the node dead, and its actors restart on the head
            try:
                nodes = set(ray.get([a.node.remote() for a in eng.rollout_workers]))
                if _alive_nodes() == [head] and nodes == {head}:
                    break
            except ray.exceptions.ActorUnavailableError:
                pass
            assert time.time() < deadline, (_alive_nodes(), head)
            time.sleep(1)
        stages.reward_stage(cfg, lay, 0, sessions, run_scoring=eng.reward_runner(cfg, "killed", 0))
        stages.learner_stage(cfg, lay, 0, sessions, run_ranks=eng.learner_runner(cfg, "killed", 0))
    _same_rollouts(ref, lay)
    _same_update(ref, lay)
