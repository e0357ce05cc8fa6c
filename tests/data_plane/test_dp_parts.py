"""Rollout parts (slices written on their own, merged into one stage) and a learner rank's share."""

from __future__ import annotations

import pytest
import torch
from dp_helpers import assert_batches_identical, make_branch_batch, make_plain_batch

from tempflow_core.algorithm.data_parallel import DataParallel, read_share, sample_keys_of
from tempflow_core.batches import PromptEmbeds
from tempflow_core.batches import RolloutBatch, branch_step_of_group, group_of_key
from tempflow_core.run.rollout_slices import slice_bounds
from tempflow_core.shards import SchemaError, publish_rollouts, read_rollouts, require_manifest, write_rollout_part
from tempflow_core.storage import open_store


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def test_slice_bounds_cover_the_batch_contiguously():
    assert slice_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert slice_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)] and slice_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="cannot cut 2 prompts into 3 slices"):
        slice_bounds(2, 3)


def _slice(batch: RolloutBatch, lo: int, hi: int) -> RolloutBatch:
    """The part of `batch` for prompts lo..hi-1 (its samples keep their global prompt index)."""
    e = batch.embeds
    emb = PromptEmbeds(e.embeds[lo:hi], e.pooled[lo:hi], e.neg_embeds, e.neg_pooled)
    items = batch.branch_points if batch.kind == "branch" else batch.trajectories
    mine = [x for x in items if lo <= x.prompt_index < hi]
    return RolloutBatch(batch.kind, batch.prompts[lo:hi], batch.prompt_ids[lo:hi], emb, batch.sigmas,
                        branch_points=mine if batch.kind == "branch" else [],
                        trajectories=mine if batch.kind == "plain" else [], forward_calls=1, nfe=2)


@pytest.mark.parametrize("kind", ["branch", "plain"])
def test_parts_merge_into_the_stage_one_writer_would_write(store, kind):
    whole = make_branch_batch(prompts=3, steps=(0, 2)) if kind == "branch" else make_plain_batch(prompts=3)
    # each prompt's samples contiguous per slice, as a slice's own rollout orders them
    key = (lambda x: (x.prompt_index, x.step)) if kind == "branch" else (lambda x: (x.prompt_index, x.member))
    items = sorted(whole.branch_points or whole.trajectories, key=key)
    whole.branch_points, whole.trajectories = (items, []) if kind == "branch" else ([], items)
    parts = [write_rollout_part(_slice(whole, lo, hi), store, "run/iter-000000/rollout", j, samples_per_shard=2)
             for j, (lo, hi) in enumerate(slice_bounds(3, 2))]
    publish_rollouts(parts[::-1], store, "run/iter-000000/rollout")  # merged in slice order, whatever the order
    got = read_rollouts(store, "run/iter-000000/rollout")
    whole.forward_calls, whole.nfe = 2, 4  # the parts' counts, summed
    assert_batches_identical(whole, got)
    m = require_manifest(store, "run/iter-000000/rollout")
    assert [s.name for s in m.shards][:2] == ["part-000-shard-000000.tar", "part-000-shard-000001.tar"]
    # the learner's view of the stage, from its manifest alone
    assert sample_keys_of(m, 3) == got.sample_keys()
    assert [group_of_key(k) for k in got.sample_keys()] == got.group_ids()
    if kind == "branch":
        assert [branch_step_of_group(group_of_key(k)) for k in got.sample_keys()] == [
            bp.step for bp in got.branch_points for _ in range(3)]


def test_parts_must_be_complete_and_of_one_kind(store):
    b = make_branch_batch(prompts=2)
    p1 = write_rollout_part(_slice(b, 1, 2), store, "r/iter-000000/rollout", 1)
    with pytest.raises(SchemaError, match="not 0..n-1"):
        publish_rollouts([p1], store, "r/iter-000000/rollout")
    assert not store.exists("r/iter-000000/rollout/manifest.json")


def test_rank_shares_partition_the_stage(store):
    b = make_branch_batch(prompts=3, steps=(0, 1, 2))
    from tempflow_core.shards import write_rollouts

    write_rollouts(b, store, "s/rollout", samples_per_shard=2)  # 9 samples in 5 shards
    m = require_manifest(store, "s/rollout")
    seen = []
    for rank in range(3):
        share, positions = read_share(store, "s/rollout", m, rank, 3)
        assert [bp.group_id for bp in share.branch_points] == [b.branch_points[p].group_id for p in positions]
        seen += positions
    assert sorted(seen) == list(range(9))
    dp = DataParallel(1, 3, 9, torch.tensor([5, 2, 7]))
    assert dp.local(torch.tensor([7, 0, 2, 8, 5])).tolist() == [2, 1, 0]  # in the minibatch's order
