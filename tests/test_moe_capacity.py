"""The capacity rule and both drop policies, on constructed inputs and against ops.permute."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hecate.moe import Routing, apply_capacity, compute_capacity
from hecate.moe.capacity import kept_mask
from hecate.ops import reference


def routing(indices, weights):
    idx = torch.tensor(indices)
    w = torch.tensor(weights, dtype=torch.float32)
    e = int(idx.max()) + 1
    return Routing(indices_TK=idx, weights_TK=w, scores_TE=torch.zeros(idx.shape[0], e),
                   logits_TE=torch.zeros(idx.shape[0], e),
                   tokens_per_expert_E=torch.bincount(idx[idx >= 0], minlength=e))


def test_compute_capacity_rule():
    assert compute_capacity(8, 2, 4, 1.0) == 4
    assert compute_capacity(10, 1, 1, 1.1) == 11  # not 12: float noise is rounded away
    assert compute_capacity(5, 1, 4, 1.0) == 2  # ceil(1.25)
    assert compute_capacity(3, 1, 4, 1.0, min_capacity=4) == 4
    assert compute_capacity(0, 2, 4, 1.0) == 0
    with pytest.raises(ValueError, match="capacity_factor"):
        compute_capacity(8, 2, 4, 0.0)


def test_position_policy_first_choices_before_second_choices():
    # 4 tokens, top-2, 2 experts; capacity = ceil(0.5 * 4 * 2 / 2) = 2
    r = routing([[0, 1], [1, 0], [0, 1], [0, 1]], [[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    out = apply_capacity(r, 0.5, 0, "position")
    # expert 0: first choices of tokens 0, 2, 3 -> keeps t0, t2; expert 1: first choice t1, then
    # second choices t0 -> keeps t1 (1st) and t0 (2nd)
    assert out.indices_TK.tolist() == [[0, 1], [1, -1], [0, -1], [-1, -1]]
    assert torch.equal(out.weights_TK, r.weights_TK * (out.indices_TK >= 0))
    assert torch.equal(out.tokens_per_expert_E, r.tokens_per_expert_E)  # pre-drop counts kept


def test_probability_policy_highest_weight_first_ties_lower_token():
    r = routing([[0, 1], [1, 0], [0, 1], [0, 1]], [[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    out = apply_capacity(r, 0.5, 0, "probability")
    # expert 0 entries: t0 .6, t1 .1, t2 .5, t3 .7 -> keep t3, t0
    # expert 1 entries: t0 .4, t1 .9, t2 .5, t3 .3 -> keep t1, t2
    assert out.indices_TK.tolist() == [[0, -1], [1, -1], [-1, 1], [0, -1]]
    tie = routing([[0], [0], [0]], [[0.5], [0.5], [0.5]])
    assert apply_capacity(tie, 1 / 3, 0, "probability").indices_TK.tolist() == [[0], [-1], [-1]]


def test_dropless_and_min_capacity():
    r = routing([[0], [0], [0], [1]], [[1.0]] * 4)
    assert apply_capacity(r, None).indices_TK is r.indices_TK
    assert (apply_capacity(r, 0.1, min_capacity=3).indices_TK >= 0).sum() == 4


def test_group_sizes_equal_each_group_alone():
    torch.manual_seed(0)
    idx = torch.randint(0, 4, (11, 2))
    w = torch.rand(11, 2)
    r = routing(idx.tolist(), w.tolist())
    r = r.replace(scores_TE=torch.zeros(11, 4), logits_TE=torch.zeros(11, 4))
    for policy in ("position", "probability"):
        whole = apply_capacity(r, 1.0, 0, policy, group_sizes=[5, 0, 6])
        a = apply_capacity(routing(idx[:5].tolist(), w[:5].tolist()), 1.0, 0, policy)
        b = apply_capacity(routing(idx[5:].tolist(), w[5:].tolist()), 1.0, 0, policy)
        assert torch.equal(whole.indices_TK, torch.cat([a.indices_TK, b.indices_TK]))
    with pytest.raises(ValueError, match="group_sizes"):
        apply_capacity(r, 1.0, group_sizes=[5, 5])


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 12), k=st.integers(1, 3), e=st.integers(3, 5), cap=st.integers(0, 6),
       policy=st.sampled_from(["position", "probability"]), seed=st.integers(0, 999),
       drop=st.booleans())
def test_kept_mask_matches_ops_permute_capacity(t, k, e, cap, policy, seed, drop):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    if drop and t:
        idx[0, -1] = -1
    w = torch.randint(0, 3, (t, k), generator=g).float() / 2  # many ties
    mine = kept_mask(idx, w, e, cap, policy)
    _, row_map, _ = reference.permute(torch.zeros(t, 1), idx, e, cap, None if policy == "position" else w)
    assert torch.equal(mine, row_map >= 0)


def test_bad_drop_policy():
    with pytest.raises(ValueError, match="drop_policy"):
        kept_mask(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 2, 1, "random")
