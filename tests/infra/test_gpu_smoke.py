"""benchmarks/gpu_smoke.py keeps working: CI runs it at the toy size on the CPU; its counts
must match the branched rollout's own arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_smoke_runs_at_toy_size_and_counts_what_it_ran(tmp_path):
    out = tmp_path / "smoke.json"
    B, K, T = 2, 3, 5
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--size", "toy", "--device", "cpu",
                          "--prompts", str(B), "--group-size", str(K), "--steps", str(T), "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    # branch points at steps 0..T-2; the backbone runs to the last of them, each child ODEs to the end
    assert r["rollout_nfe"] == B * ((T - 1) + K * sum(T - 1 - k for k in range(T - 1)))
    assert r["images"] == B * (T - 1) * K
    assert r["learner_units"] == B * (T - 1) and r["learner_terms"] == B * (T - 1) * K
    # a learner unit = a forward with grad + the reference forward + backward: 2 to 4 forwards
    assert 2.0 < r["flops_per_learner_unit"] / r["flops_per_nfe"] < 4.0
    assert r["images_per_s"] > 0 and r["learner_units_per_s"] > 0 and r["rollout_mfu"] is None
    assert "images/s" in res.stdout and "units/s" in res.stdout
