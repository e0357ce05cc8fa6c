"""Rollout slices: an iteration's prompts cut into contiguous slices, each sampled as one
batch and written as its own shards, then merged into one stage output.

A slice is the unit of work of rollout workers (pipeline.engine=ray): with `rollout.slices`
fixed, which worker samples which slice changes nothing, because noise is seeded by each
prompt's slot in the iteration's batch and every slice is computed as the same batch
wherever it runs. The local engine samples the slices one after the other in this process.

    records    [B] the iteration's prompts (prompt stream at checkpoint i-1's position)
    slice j    records[lo_j:hi_j], sizes differ by at most one
    part j     shards part-{j:03d}-shard-*.tar + its prompts and embeddings (RolloutPart)
"""

from __future__ import annotations

from typing import Callable

from tempflow_core.algorithm.checkpoint import load_checkpoint, read_state
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.prompts import PromptRecord, PromptStream, load_prompts
from tempflow_core.algorithm.session import SessionCache, restore
from tempflow_core.shards import RolloutPart, write_rollout_part
from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.train import run_rollout


def slice_bounds(n: int, slices: int) -> list[tuple[int, int]]:
    """[lo, hi) of `slices` contiguous slices of n items, sizes differing by at most one."""
    if not 1 <= slices <= n:
        raise ValueError(f"cannot cut {n} prompts into {slices} slices")
    q, r = divmod(n, slices)
    bounds, lo = [], 0
    for j in range(slices):
        hi = lo + q + (1 if j < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def iteration_records(cfg: RunConfig, layout: RunLayout, iteration: int) -> tuple[list[PromptRecord], int]:
    """Iteration i's prompts and the stream position after them, from checkpoint i-1's
    state.json alone (no model is loaded)."""
    state = read_state(layout.store, layout.prefix(iteration - 1, "learner"))
    stream = PromptStream(load_prompts(cfg.prompts.source), cfg.train.seed, int(state["stream_position"]))
    records = stream.next_batch(cfg.rollout.prompts_per_iter)
    return records, stream.position


def sample_slice(cfg: RunConfig, layout: RunLayout, iteration: int, index: int, sessions: SessionCache,
                 progress: Callable[[int], None] | None = None) -> RolloutPart:
    """Sample slice `index` of iteration i with checkpoint i-1 and write its shards (no manifest)."""
    records, _ = iteration_records(cfg, layout, iteration)
    lo, hi = slice_bounds(len(records), cfg.rollout.slices)[index]
    s = sessions.get(cfg)
    restore(s, load_checkpoint(layout.store, layout.prefix(iteration - 1, "learner")), with_optimizer=False)
    batch = run_rollout(s, records[lo:hi], plan_iteration(cfg, s.schedule, iteration), progress, start=lo)
    for item in batch.branch_points or batch.trajectories:  # rows of the merged stage's prompts
        item.prompt_index += lo
    return write_rollout_part(batch, layout.store, layout.prefix(iteration, "rollout"), index,
                              samples_per_shard=cfg.pipeline.samples_per_shard)
