"""Failpoints: named places where a test makes this process die as a crash would.

    TEMPFLOW_FAILPOINTS="learner.allreduce/rank1=/tmp/x/allreduce,learner.job/*=/tmp/x/job"

Each entry is `pattern=marker`: the first process that reaches a point whose name matches
`pattern` (fnmatch) creates the file `marker` (O_EXCL: exactly one process wins) and SIGKILLs
itself; every later arrival finds the marker and goes on. `pattern=raise:marker` raises
FailpointError there instead (a stage that fails once, as a flaky reward would). A fault so fires once across
restarts, retries and processes, and the marker says that it fired. Without the variable
(always, outside tests), `hit` reads one environment variable and returns.

Points (the Ray learner, tempflow_core.engines.ray_engine and data_parallel):
    learner.job/rank{r}         a rank has taken a stage's job, before any work on it
    learner.minibatch/rank{r}   a rank starts a minibatch of the update
    learner.allreduce/rank{r}   a rank enters the gradient all-reduce
    learner.checkpoint/rank0    rank 0 has written the advantages, not yet checkpoint i
    reward.score/{run}          the reward stage of run {run} starts scoring (tempflow_core.run.stages)
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "TEMPFLOW_FAILPOINTS"
RAISE = "raise:"


class FailpointError(RuntimeError):
    """The fault a `raise:` failpoint injects (not transient: a stage fails on it at once)."""


def hit(point: str) -> None:
    """Die here (SIGKILL), or raise FailpointError for a `raise:` entry, if a configured pattern
    matches `point` and its marker is not yet written."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return
    for entry in spec.split(","):
        pattern, _, marker = entry.partition("=")
        marker = marker.strip()
        raises = marker.startswith(RAISE)
        marker = marker[len(RAISE):] if raises else marker
        if not marker or not fnmatch.fnmatchcase(point, pattern.strip()):
            continue
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        if raises:
            raise FailpointError(f"failpoint {point}: an injected fault (marker {marker})")
        os.kill(os.getpid(), signal.SIGKILL)
