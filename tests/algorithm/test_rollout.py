"""Branched (wavefront) and plain rollouts on the tiny SD3 model."""

import numpy as np
import pytest
import torch

from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.algorithm.rollout import branched_rollout, branched_rollout_loop, plain_rollout
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.sde import sde_log_prob

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
IDS = ["p0", "p1", "p2"]


@pytest.fixture
def policy(tiny_pipe):
    return SD3Policy(tiny_pipe, None, "cpu")


def test_children_share_x_k_bit_for_bit_and_nfe_is_at_the_floor(policy):
    T, K = 6, 4
    s = make_schedule(T)
    b = branched_rollout(policy, PROMPTS, IDS, s, list(range(T)), K, 4.5, seed=7, max_batch=16)
    assert len(b.branch_points) == len(PROMPTS) * T
    assert b.nfe == len(PROMPTS) * (T + K * T * (T - 1) // 2)
    for bp in b.branch_points:
        assert bp.x_next.shape[0] == K and bp.images.shape == (K, 32, 32, 3)
        # every child left the same x_k, with its own noise
        assert not torch.equal(bp.x_next[0], bp.x_next[1])
        assert len(set(bp.seeds.tolist())) == K
    # x_k of (prompt, k) is the backbone state: the same tensor for every child of that point,
    # and stored once; two prompts differ
    by_prompt = {}
    for bp in b.branch_points:
        by_prompt.setdefault(bp.prompt_index, []).append(bp)
    assert not torch.equal(by_prompt[0][2].x_k, by_prompt[1][2].x_k)


def test_backbone_identical_across_runs_and_children_reproducible(policy):
    s = make_schedule(5)
    a = branched_rollout(policy, PROMPTS, IDS, s, [0, 2, 4], 3, 4.5, seed=11)
    b = branched_rollout(policy, PROMPTS, IDS, s, [0, 2, 4], 3, 4.5, seed=11)
    for x, y in zip(a.branch_points, b.branch_points):
        assert torch.equal(x.x_k, y.x_k) and torch.equal(x.x_next, y.x_next)
        assert torch.equal(x.final_latents, y.final_latents)
    c = branched_rollout(policy, PROMPTS, IDS, s, [0, 2, 4], 3, 4.5, seed=12)
    assert not torch.equal(a.branch_points[0].x_k, c.branch_points[0].x_k)


def test_wavefront_equals_per_branch_step_loop(policy):
    T, K = 6, 3
    s = make_schedule(T)
    wave = branched_rollout(policy, PROMPTS, IDS, s, [0, 1, 3, 5], K, 4.5, seed=3, max_batch=7)
    loop = branched_rollout_loop(policy, PROMPTS, IDS, s, [0, 1, 3, 5], K, 4.5, seed=3)
    key = lambda g: (g.step, g.prompt_index)  # noqa: E731
    assert [key(g) for g in sorted(wave.branch_points, key=key)] == [key(g) for g in loop.branch_points]
    for w, l in zip(sorted(wave.branch_points, key=key), loop.branch_points):
        assert torch.equal(w.seeds, l.seeds)
        torch.testing.assert_close(w.x_k, l.x_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.x_next, l.x_next, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.final_latents, l.final_latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w.log_prob, l.log_prob, rtol=1e-4, atol=1e-4)
    # unchunked, the wavefront merges the loop's separate inner calls into one call per step
    whole = branched_rollout(policy, PROMPTS, IDS, s, [0, 1, 3, 5], K, 4.5, seed=3)
    assert whole.nfe == wave.nfe == loop.nfe
    assert whole.forward_calls == T < loop.forward_calls
    for w, c in zip(whole.branch_points, wave.branch_points):
        torch.testing.assert_close(w.final_latents, c.final_latents, rtol=1e-4, atol=1e-4)


def test_stored_log_probs_are_those_of_the_policy(policy):
    s = make_schedule(4)
    b = branched_rollout(policy, PROMPTS[:2], IDS[:2], s, [1, 2], 3, 4.5, seed=5)
    sig, ss = s.sigmas, s.sde_sigma()
    for bp in b.branch_points:
        emb = b.embeds
        r = torch.tensor([bp.prompt_index])
        v = policy.velocity(bp.x_k[None], torch.tensor(bp.t), emb.select(r), 4.5)
        lp, _, _ = sde_log_prob(bp.x_next, bp.x_k[None].expand_as(bp.x_next), v.expand_as(bp.x_next),
                                float(sig[bp.step]), float(sig[bp.step + 1]), float(ss[bp.step]))
        torch.testing.assert_close(lp, bp.log_prob, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["branch", "plain"])
def test_a_bf16_model_keeps_its_states_in_bf16_with_the_log_probs_of_those_states(tiny_pipe, kind):
    """States are kept (and written to the shards) in the model's half precision: the log-prob
    kept with each is the transition's density at the rounded state from the rounded state, what
    the learner computes from the shards, exactly."""
    pol = SD3Policy(tiny_pipe.to(torch.bfloat16), None, "cpu")
    s = make_schedule(4)
    sig, ss = s.sigmas, s.sde_sigma()
    emb = None
    if kind == "branch":
        b = branched_rollout(pol, PROMPTS[:2], IDS[:2], s, [0, 2], 3, 4.5, seed=5, decode=False)
        emb = b.embeds
        cases = [(bp.x_k[None].expand_as(bp.x_next), bp.x_next, bp.step, bp.prompt_index, bp.log_prob)
                 for bp in b.branch_points]
        assert all(bp.x_k.dtype == bp.x_next.dtype == torch.bfloat16 for bp in b.branch_points)
    else:
        b = plain_rollout(pol, PROMPTS[:2], IDS[:2], s, 2, 4.5, seed=1, decode=False)
        emb = b.embeds
        cases = [(tr.states[i][None], tr.states[i + 1][None], i, tr.prompt_index, tr.log_probs[i:i + 1])
                 for tr in b.trajectories for i in range(4)]
        assert all(tr.states.dtype == torch.bfloat16 for tr in b.trajectories)
    for x, x_next, step, p, kept in cases:
        r = torch.tensor([p]).expand(x.shape[0])
        v = pol.velocity(x.float(), torch.tensor(float(sig[step])), emb.select(r), 4.5)
        lp, _, _ = sde_log_prob(x_next.float(), x.float(), v, float(sig[step]), float(sig[step + 1]), float(ss[step]))
        assert torch.equal(lp.float(), kept)


def test_plain_rollout_trajectories(policy):
    s = make_schedule(4)
    b = plain_rollout(policy, PROMPTS[:2], IDS[:2], s, 3, 4.5, seed=1)
    assert len(b.trajectories) == 6 and b.nfe == 6 * 4
    assert len(set(b.sample_keys())) == 6 and b.group_ids() == ["p0"] * 3 + ["p1"] * 3
    tr = b.trajectories[0]
    assert tr.states.shape == (5, 4, 8, 8) and tr.log_probs.shape == (4,)
    assert np.isfinite(tr.log_probs.numpy()).all()
    again = plain_rollout(policy, PROMPTS[:2], IDS[:2], s, 3, 4.5, seed=1)
    assert torch.equal(again.trajectories[4].states, b.trajectories[4].states)


def _finish_by_hand(policy, b, bp, nodes, guidance):
    """A child's ODE completion computed one row at a time from its SDE step's output."""
    sig = b.sigmas.tolist()
    r = torch.tensor([bp.prompt_index])
    out = []
    for x in bp.x_next:
        x = x[None]
        for a, c in zip(nodes[:-1], nodes[1:]):
            v = policy.velocity(x, torch.tensor(sig[a]), b.embeds.select(r), guidance)
            x = x + (sig[c] - sig[a]) * v
        out.append(x[0])
    return torch.stack(out)


def test_completion_nodes_and_rows():
    from tempflow_core.algorithm.rollout import completion_nodes, completion_rows

    assert completion_nodes(0, 6, 1) == [1, 2, 3, 4, 5, 6]
    assert completion_nodes(0, 6, 2) == [1, 3, 5, 6]
    assert completion_nodes(1, 6, 3) == [2, 5, 6]
    assert completion_nodes(4, 6, 9) == [5, 6]
    assert completion_nodes(5, 6, 2) == [6]  # a branch at the last step has nothing left to finish
    # T = 6, K = 4, steps 0..4: 4 * (5+4+3+2+1) full; stride 2: 4 * (3+2+2+1+1)
    assert completion_rows(list(range(5)), 6, 4) == 60
    assert completion_rows(list(range(5)), 6, 4, stride=2) == 36
    with pytest.raises(ValueError, match="stride"):
        completion_nodes(0, 6, 0)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_coarse_completion_finishes_children_over_every_stride_th_node(policy, stride):
    from tempflow_core.algorithm.rollout import completion_nodes, completion_rows

    T, K, steps = 6, 3, [0, 1, 3]
    s = make_schedule(T)
    b = branched_rollout(policy, PROMPTS[:2], IDS[:2], s, steps, K, 4.5, seed=4, max_batch=5, stride=stride)
    full = branched_rollout(policy, PROMPTS[:2], IDS[:2], s, steps, K, 4.5, seed=4, max_batch=5)
    # the backbone takes T - ... steps up to the last branch step; children take their nodes
    assert b.nfe == 2 * (steps[-1] + 1) + 2 * completion_rows(steps, T, K, stride)
    for bp, fb in zip(b.branch_points, full.branch_points):
        # what the learner reads is the same whatever the stride
        assert torch.equal(bp.x_k, fb.x_k) and torch.equal(bp.x_next, fb.x_next)
        assert torch.equal(bp.log_prob, fb.log_prob)
        want = _finish_by_hand(policy, b, bp, completion_nodes(bp.step, T, stride), 4.5)
        torch.testing.assert_close(bp.final_latents, want, rtol=1e-4, atol=1e-4)
        if stride == 1:
            assert torch.equal(bp.final_latents, fb.final_latents)
        elif len(completion_nodes(bp.step, T, stride)) < T - bp.step:  # a coarser solve lands elsewhere
            assert not torch.allclose(bp.final_latents, fb.final_latents, atol=1e-4)
    loop = branched_rollout_loop(policy, PROMPTS[:2], IDS[:2], s, steps, K, 4.5, seed=4, stride=stride)
    assert loop.nfe == b.nfe
    key = lambda g: (g.step, g.prompt_index)  # noqa: E731
    for w, l in zip(sorted(b.branch_points, key=key), loop.branch_points):
        torch.testing.assert_close(w.final_latents, l.final_latents, rtol=1e-4, atol=1e-4)
