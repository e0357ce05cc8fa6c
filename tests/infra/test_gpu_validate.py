"""benchmarks/gpu_validate.py, the GPU check, keeps working: CI runs it at the toy size on the CPU,
with the two-rank update on gloo, whole and FSDP-sharded (on GPUs it runs on NCCL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_validate_runs_at_toy_size_with_two_ranks(tmp_path):
    out = tmp_path / "validate.json"
    B, K, T = 2, 3, 4
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_validate", "--size", "toy", "--device", "cpu",
                          "--prompts", str(B), "--group-size", str(K), "--steps", str(T), "--iterations", "2",
                          "--two-ranks", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TEMPFLOW_VALIDATE_PORT": "29617"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    its = [x for x in r["records"] if "iteration" in x]
    assert [x["iteration"] for x in its] == [0, 1]
    for x in its:
        assert x["rollout_nfe"] == B * ((T - 1) + K * sum(T - 1 - k for k in range(T - 1)))
        assert x["ratio_first_min"] == x["ratio_first_max"] == 1.0  # unchanged weights, the rollout's own shapes
        assert x["shard_bytes"] > 0 and x["rollout_estimate_gib"] > 0 and x["learner_estimate_gib"] > 0
    ranks = r["records"][-1]
    assert ranks["two_ranks_max_relative_delta_error"] < 1e-3  # the all-reduce's summation order only
    assert ranks["fsdp_max_relative_delta_error"] < 1e-3  # the reduce-scatter's summation order only
    assert ranks["fsdp_estimate_gib"] > 0  # its arithmetic: tests/algorithm/test_memory.py
    assert "two gloo ranks" in res.stdout and "first minibatch's ratio" in res.stdout
    assert "two gloo ranks, transformer sharded (FSDP2)" in res.stdout
