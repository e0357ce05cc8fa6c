"""tempflow_core.failpoints: a matching point kills its process once, across processes."""

from __future__ import annotations

import signal
import subprocess
import sys

from tempflow_core import failpoints

CODE = "from tempflow_core import failpoints; failpoints.hit(sys.argv[1]); print('passed')"


def _run(point: str, spec: str | None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if spec is not None:
        env[failpoints.ENV] = spec
    return subprocess.run([sys.executable, "-c", "import sys; " + CODE, point], capture_output=True, text=True,
                          env=env, timeout=60)


def test_a_matching_point_kills_the_first_process_only_and_leaves_its_marker(tmp_path):
    marker = tmp_path / "fired"
    spec = f"learner.allreduce/rank1={marker},learner.job/*={tmp_path / 'other'}"
    first = _run("learner.allreduce/rank1", spec)
    assert first.returncode == -signal.SIGKILL and first.stdout == ""
    assert marker.exists() and not (tmp_path / "other").exists()
    second = _run("learner.allreduce/rank1", spec)  # the restarted process goes on
    assert second.returncode == 0 and second.stdout.strip() == "passed"


def test_other_points_and_no_variable_go_on(tmp_path):
    spec = f"learner.allreduce/rank1={tmp_path / 'fired'}"
    for point, s in (("learner.allreduce/rank0", spec), ("learner.minibatch/rank1", spec),
                     ("learner.allreduce/rank1", None), ("learner.allreduce/rank1", "")):
        out = _run(point, s)
        assert out.returncode == 0 and out.stdout.strip() == "passed", (point, s)
    assert not (tmp_path / "fired").exists()


def test_a_raise_entry_raises_once_in_the_first_process_and_the_next_goes_on(tmp_path):
    marker = tmp_path / "fired"
    spec = f"reward.score/tempflow-*=raise:{marker}"
    first = _run("reward.score/tempflow-1a2b", spec)
    assert first.returncode == 1 and "FailpointError: failpoint reward.score/tempflow-1a2b" in first.stderr
    assert marker.exists()
    assert _run("reward.score/tempflow-1a2b", spec).stdout.strip() == "passed"  # fires once
    assert _run("reward.score/branch-1a2b", f"reward.score/tempflow-*=raise:{tmp_path / 'b'}").returncode == 0
    assert not (tmp_path / "b").exists()
