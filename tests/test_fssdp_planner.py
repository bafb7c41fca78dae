"""Unit tests of the FSSDP planning algorithms: exact placements on constructed loads."""
import hashlib

import numpy as np
import pytest
import torch

from hecate.parallel.fssdp import (
    CostModel,
    HecatePolicy,
    LoadPredictor,
    NoReplicationPolicy,
    Plan,
    ShadowingPolicy,
    build_plan,
    even_sharding,
    heterogeneous_sharding,
    node_of_ranks,
    proportional_quota,
    rank_splits,
    reshard_if_changed,
    reshard_moves,
    slots_per_rank,
    token_routes,
    route_tokens,
    TokenRoutes,
)


def cost_model(**kw):
    base = dict(intra_node_bw=1e9, inter_node_bw=1e9, chunk_bytes=10**6, t_non_moe=1.5e-3,
                token_compute_s=1e-5, token_bytes=1024)
    base.update(kw)
    return CostModel(**base)


def T(x, dtype=torch.int64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- load
def test_load_predictor_uniform_then_window_mean():
    p = LoadPredictor(3, window=2)
    assert p.predict().tolist() == [1.0, 1.0, 1.0]
    p.update(T([2, 0, 4]))
    assert p.predict().tolist() == [2.0, 0.0, 4.0]
    p.update(T([4, 2, 0]))
    assert p.predict().tolist() == [3.0, 1.0, 2.0]
    p.update(T([0, 0, 0]))  # oldest ([2, 0, 4]) falls out of the window
    assert p.predict().tolist() == [2.0, 1.0, 0.0]
    p.update_from_rank_counts(T([[1, 1, 1], [1, 1, 1]]))
    assert p.predict().tolist() == [1.0, 1.0, 1.0]
    assert len(p) == 2
    p.reset()
    assert p.predict().tolist() == [1.0, 1.0, 1.0]


def test_load_predictor_bad_inputs():
    with pytest.raises(ValueError, match="num_experts"):
        LoadPredictor(0)
    with pytest.raises(ValueError, match="window"):
        LoadPredictor(4, window=0)
    p = LoadPredictor(3)
    with pytest.raises(ValueError, match="global_counts_E"):
        p.update(T([1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        p.update(T([1, -2, 0]))
    with pytest.raises(ValueError, match="counts_WE"):
        p.update_from_rank_counts(T([[1, 2]]))
    with pytest.raises(ValueError, match="finite"):
        p.update(T([1.0, float("nan"), 0.0], torch.float64))


# ---------------------------------------------------------------- cost
def test_overlap_degree_uses_inter_node_bandwidth_across_nodes():
    cm = cost_model(intra_node_bw=8e9, inter_node_bw=1e9, chunk_bytes=10**6, t_non_moe=2.5e-3)
    assert cm.overlap_degree(multi_node=False) == 20
    assert cm.overlap_degree(multi_node=True) == 2


def test_plan_time_components():
    cm = cost_model(intra_node_bw=2e9, inter_node_bw=1e9, chunk_bytes=10**6, t_non_moe=0.0,
                    token_compute_s=1e-3, token_bytes=10**6)
    nodes = node_of_ranks(2, 1).numpy()  # two nodes -> inter-node bandwidth
    owner = np.array([0, 1])
    holders = np.array([[True, False], [True, True]])  # rank 1 gathers expert 0
    routes = np.zeros((2, 2, 2), dtype=np.int64)
    routes[0, 0, 1] = 3  # rank 0 sends 3 tokens of expert 0 to rank 1
    routes[1, 1, 1] = 5
    # rank 1: compute 8 tokens (8 ms) + a2a 2 * 3 MB / 1 GB/s (6 ms) + gather 1 MB (1 ms)
    assert cm.plan_time(holders, owner, routes, nodes) == pytest.approx(15e-3)
    # Hidden gather: T_non_moe covers it.
    assert cm.plan_time(holders, owner, routes, nodes, hidden_s=1.0) == pytest.approx(14e-3)


def test_cost_model_bad_values():
    with pytest.raises(ValueError, match="inter_node_bw"):
        cost_model(inter_node_bw=0)
    with pytest.raises(ValueError, match="t_non_moe"):
        cost_model(t_non_moe=-1.0)


# ---------------------------------------------------------------- quotas
def test_proportional_quota_caps_and_largest_remainder():
    assert proportional_quota(np.array([4.0, 2, 1, 1]), 8, cap=3).tolist() == [3, 3, 1, 1]
    assert proportional_quota(np.array([1.0, 1, 1]), 2, cap=5).tolist() == [1, 1, 0]  # ties: index
    assert proportional_quota(np.array([0.0, 3, 1]), 4, cap=9).tolist() == [0, 3, 1]
    assert proportional_quota(np.array([5.0, 5]), 100, cap=3).tolist() == [3, 3]  # not enough room
    assert proportional_quota(np.zeros(3), 4, cap=3).tolist() == [0, 0, 0]


# ---------------------------------------------------------------- Algorithm 1
def test_hecate_top_t_everywhere_when_t_le_m():
    W, E = 4, 8
    owner = even_sharding(E, W)
    load = T([1, 9, 3, 9, 0, 2, 5, 0], torch.float64)
    h = HecatePolicy(overlap_degree=2).plan(load, owner, node_of_ranks(W, 2), capacity_m=3)
    expected = torch.zeros(W, E, dtype=torch.bool)
    expected[owner, torch.arange(E)] = True
    expected[:, [1, 3]] = True  # ties 9 = 9 broken by index
    assert torch.equal(h, expected)


def test_hecate_top_t_skips_experts_without_load_and_t_zero_is_p0():
    owner = even_sharding(4, 2)
    load = T([0, 0, 7, 0], torch.float64)
    h = HecatePolicy(overlap_degree=3).plan(load, owner, node_of_ranks(2, 2), capacity_m=3)
    assert h.tolist() == [[True, True, True, False], [False, False, True, True]]
    h0 = HecatePolicy(overlap_degree=0).plan(load, owner, node_of_ranks(2, 2), capacity_m=3)
    assert torch.equal(h0, NoReplicationPolicy().plan(load, owner, node_of_ranks(2, 2), 3))


def test_hecate_proportional_uniform_prefers_nodes_lacking_the_expert():
    # 2 nodes x 2 ranks, one expert per rank, m = 1 and t = 5 > m: one extra copy each.
    W = E = 4
    h = HecatePolicy(overlap_degree=5).plan(torch.ones(E, dtype=torch.float64),
                                            even_sharding(E, W), node_of_ranks(W, 2), 1)
    extra = h & ~torch.eye(4, dtype=torch.bool)
    assert sorted(map(tuple, extra.nonzero().tolist())) == [(0, 2), (1, 3), (2, 0), (3, 1)]


def test_hecate_proportional_one_hot_expert():
    W = E = 4
    load = T([100, 1, 1, 1], torch.float64)
    h = HecatePolicy(overlap_degree=5).plan(load, even_sharding(E, W), node_of_ranks(W, 2), 1)
    expected = torch.eye(4, dtype=torch.bool)
    expected[:, 0] = True  # quota 3 = cap: on every rank
    expected[0, 1] = True  # remaining slot: node 1 is full, so rank 0
    assert torch.equal(h, expected)


def test_hecate_respects_capacity_and_fills_it_under_zipf():
    W, E, m = 8, 16, 3
    load = torch.tensor([1.0 / (i + 1) ** 1.2 for i in range(E)], dtype=torch.float64) * 1000
    owner = even_sharding(E, W)
    h = HecatePolicy(overlap_degree=100).plan(load, owner, node_of_ranks(W, 4), m)
    extra = h.clone()
    extra[owner, torch.arange(E)] = False
    assert extra.sum(1).tolist() == [m] * W  # every slot used
    copies = h.sum(0)
    assert copies[0] == W and copies[0] >= copies[1] >= copies[5] >= copies[-1]


def test_hecate_needs_t_source_and_bad_inputs_name_argument():
    with pytest.raises(ValueError, match="overlap_degree"):
        HecatePolicy()
    with pytest.raises(ValueError, match="cost_model"):
        HecatePolicy(overlap_degree=1, calibrate=True)
    p = HecatePolicy(overlap_degree=1)
    nodes, owner, load = node_of_ranks(2, 1), even_sharding(4, 2), torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="capacity_m"):
        p.plan(load, owner, nodes, 0)
    with pytest.raises(ValueError, match="owner_E"):
        p.plan(load, owner[:3], nodes, 1)
    with pytest.raises(ValueError, match="owner_E"):
        p.plan(load, T([0, 1, 2, 0]), nodes, 1)
    with pytest.raises(ValueError, match="predicted_load_E"):
        p.plan(-load, owner, nodes, 1)
    with pytest.raises(ValueError, match="counts_WE"):
        p.plan(load, owner, nodes, 1, counts_WE=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="node_of_W"):
        p.plan(load, owner, T([0, 2]), 1)
    with pytest.raises(TypeError, match="owner_E"):
        p.plan(load, owner.double(), nodes, 1)


def test_hecate_calibration_switches_only_when_faster():
    W, E = 4, 8
    owner, nodes = even_sharding(E, W), node_of_ranks(W, 2)
    predicted = torch.zeros(E, dtype=torch.float64)
    predicted[0] = 100.0  # history says expert 0 is hot
    counts = torch.zeros(W, E, dtype=torch.int64)
    counts[:, 5] = 2500  # the real batch sends everything to expert 5
    cheap = cost_model()  # t = 1, 1 ms exposed gather vs 75 ms of imbalance saved
    p = HecatePolicy(cheap, calibrate=True)
    assert cheap.overlap_degree(True) == 1
    h = p.plan(predicted, owner, nodes, 1, counts_WE=counts)
    assert p.last_calibrated and h[:, 5].all() and h[:, 0].sum() == 1
    dear = cost_model(chunk_bytes=10**9, t_non_moe=1.5)  # still t = 1, but 1 s exposed gather
    p = HecatePolicy(dear, calibrate=True)
    h = p.plan(predicted, owner, nodes, 1, counts_WE=counts)
    assert not p.last_calibrated and h[:, 0].all() and h[:, 5].sum() == 1
    # Without counts there is nothing to calibrate on.
    h = p.plan(predicted, owner, nodes, 1)
    assert not p.last_calibrated and h[:, 0].all()


# ---------------------------------------------------------------- shadowing / none
def test_shadowing_replicates_the_hot_expert_when_broadcast_is_cheap():
    W, E = 4, 4
    owner, nodes = even_sharding(E, W), node_of_ranks(W, 2)
    counts = torch.full((W, E), 10, dtype=torch.int64)
    counts[:, 2] = 5000
    h = ShadowingPolicy(cost_model()).plan(torch.ones(E), owner, nodes, 2, counts_WE=counts)
    expected = torch.eye(4, dtype=torch.bool)
    expected[:, 2] = True
    assert torch.equal(h, expected)


def test_shadowing_keeps_p0_when_broadcast_dominates_or_load_is_balanced():
    W, E = 4, 4
    owner, nodes = even_sharding(E, W), node_of_ranks(W, 2)
    counts = torch.full((W, E), 10, dtype=torch.int64)
    counts[:, 2] = 5000
    dear = cost_model(chunk_bytes=10**10)
    p0 = torch.eye(4, dtype=torch.bool)
    assert torch.equal(ShadowingPolicy(dear).plan(torch.ones(E), owner, nodes, 2, counts), p0)
    balanced = torch.full((W, E), 10, dtype=torch.int64)
    assert torch.equal(ShadowingPolicy(cost_model(chunk_bytes=10**8)).plan(
        torch.ones(E), owner, nodes, 2, balanced), p0)
    with pytest.raises(ValueError, match="counts_WE"):
        ShadowingPolicy(cost_model()).plan(torch.ones(E), owner, nodes, 2)
    with pytest.raises(TypeError, match="CostModel"):
        ShadowingPolicy(None)


def test_no_replication_is_p0():
    owner = T([2, 2, 0])
    h = NoReplicationPolicy().plan(torch.ones(3), owner, node_of_ranks(3, 3), 5)
    assert h.tolist() == [[False, False, True], [False, False, False], [True, True, False]]


# ---------------------------------------------------------------- routes
def test_routes_local_then_same_node_then_cross_node_exact():
    nodes = node_of_ranks(4, 2)  # ranks 0,1 | 2,3
    holders = torch.zeros(4, 3, dtype=torch.bool)
    holders[[0, 3], 0] = True
    holders[[0, 1], 1] = True
    holders[2, 2] = True
    counts = T([[3, 0, 0], [5, 0, 0], [7, 5, 0], [0, 0, 0]])  # expert 2 gets no tokens
    r = token_routes(holders, counts, nodes)
    assert r[0, 0].tolist() == [3, 0, 0, 0]  # local
    assert r[1, 0].tolist() == [5, 0, 0, 0]  # same node (rank 0), not rank 3
    assert r[2, 0].tolist() == [0, 0, 0, 7]  # same node (rank 3)
    assert r[2, 1].tolist() == [2, 3, 0, 0]  # cross node, 5 = 2 + 3, remainder rotated by 2 + 1
    assert r[:, 2].sum() == 0
    assert torch.equal(r.sum(-1), counts)


def test_routes_all_tokens_to_one_expert_spread_evenly():
    W = 4
    nodes = node_of_ranks(W, 4)
    holders = torch.zeros(W, 2, dtype=torch.bool)
    holders[[1, 2, 3], 0] = True
    holders[0, 1] = True
    counts = T([[10, 0], [0, 0], [0, 0], [0, 0]])
    r = token_routes(holders, counts, nodes)
    assert sorted(r[0, 0].tolist()) == [0, 3, 3, 4] and r[0, 0, 0] == 0


def test_routes_errors_and_rank_splits():
    nodes = node_of_ranks(2, 1)
    holders = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="no holder of expert 1"):
        token_routes(holders, T([[0, 0], [0, 3]]), nodes)
    assert token_routes(holders, T([[4, 0], [1, 0]]), nodes)[1, 0].tolist() == [1, 0]
    with pytest.raises(ValueError, match="counts_WE"):
        token_routes(holders, T([[0, 0]]), nodes)
    with pytest.raises(ValueError, match="counts_WE"):
        token_routes(holders, T([[0, -1], [0, 0]]), nodes)
    with pytest.raises(ValueError, match="node_of_W"):
        token_routes(holders, T([[0, 0], [0, 0]]), node_of_ranks(4, 2))
    with pytest.raises(TypeError, match="holders_WE"):
        token_routes(holders.long(), T([[0, 0], [0, 0]]), nodes)
    r = token_routes(torch.ones(2, 2, dtype=torch.bool), T([[4, 1], [2, 6]]), nodes)
    send, recv = rank_splits(r, 1)
    assert send.tolist() == [[0, 0], [2, 6]] and recv.tolist() == [[0, 0], [2, 6]]
    with pytest.raises(ValueError, match="rank"):
        rank_splits(r, 2)


# ---------------------------------------------------------------- plan
def test_plan_splits_match_across_ranks_and_digest_is_stable():
    W, E = 3, 5
    nodes, owner = T([0, 0, 1]), even_sharding(E, W)
    counts = T([[5, 0, 1, 9, 2], [0, 0, 0, 0, 0], [3, 3, 3, 3, 30]])
    plan = build_plan(HecatePolicy(overlap_degree=1), counts.sum(0).double(), owner, counts,
                      nodes, 1)
    for s in range(W):
        for d in range(W):
            assert plan.send_splits(s)[d] == plan.recv_splits(d)[s] == plan.tokens_WW[s, d]
    assert plan.holders_WE[:, 4].all()  # the hottest expert (t = 1)
    assert plan.gather_WE.sum() == 2
    again = build_plan(HecatePolicy(overlap_degree=1), counts.sum(0).double(), owner, counts,
                       nodes, 1)
    assert again.digest() == plan.digest()
    assert torch.equal(again.digest_words(), plan.digest_words())
    assert plan.digest_words().dtype == torch.int64 and plan.digest_words().shape == (4,)
    r = plan.routes
    moved = TokenRoutes(r.holders_WE, r.counts_WE, r.node_of_W, [[2, 4, 2, -1], [2, 4, 0, 1]])
    assert torch.equal(Plan(plan.owner_E, plan.holders_WE, moved).routes_WEW - plan.routes_WEW,
                       torch.sparse_coo_tensor([[2, 2], [4, 4], [2, 0]], [-1, 1], (3, 5, 3)).to_dense())
    assert Plan(plan.owner_E, plan.holders_WE, moved).digest() != plan.digest()
    tiny = Plan(T([0]), torch.tensor([[True]]), route_tokens(torch.tensor([[True]]), T([[2]]), T([0])))
    # The format is pinned: tag, then (shape, little-endian int64 values) of owner, holders,
    # counts, node of each rank and the moves [K, 4] (the routes are a function of these).
    words = [1, 0, 1, 1, 1, 1, 1, 2, 1, 0, 0, 4]
    expected = hashlib.sha256(b"hecate-fssdp-plan-v2" + np.asarray(words, "<i8").tobytes())
    assert tiny.digest() == expected.hexdigest()
    assert tiny.routes_WEW.tolist() == [[[2]]]
    with pytest.raises(TypeError, match="TokenRoutes"):
        Plan(T([0]), torch.tensor([[True]]), T([[[2]]]))
    with pytest.raises(TypeError, match="policy"):
        build_plan("hecate", counts.sum(0).double(), owner, counts, nodes, 1)


# ---------------------------------------------------------------- sharding
def test_even_sharding_blocks():
    assert even_sharding(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert even_sharding(2, 4).tolist() == [0, 1]
    assert even_sharding(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="world_size"):
        even_sharding(8, 0)


def test_slots_per_rank_spreads_remainder_over_nodes():
    assert slots_per_rank(15, 4, 2).tolist() == [4, 4, 4, 3]  # ranks 0, 2, 1 get one more
    assert slots_per_rank(13, 4, 2).tolist() == [4, 3, 3, 3]
    assert slots_per_rank(14, 4, 2).tolist() == [4, 3, 4, 3]


def test_heterogeneous_sharding_exact_small():
    loads = T([[4.0, 3, 2, 1]], torch.float64)
    assert heterogeneous_sharding(loads, 2, 1, 0).tolist() == [[0, 1, 1, 0]]
    assert heterogeneous_sharding(loads, 2, 1, 1).tolist() == [[0, 0, 1, 1]]


def test_heterogeneous_sharding_spreads_hot_experts_over_nodes_and_balances_slots():
    L, E, W = 3, 8, 8
    loads = torch.ones(L, E, dtype=torch.float64)
    loads[:, 0] = 50.0
    loads[:, 1] = 40.0
    owner = heterogeneous_sharding(loads, W, 4, 0)
    node = owner // 4
    for l in range(L):
        assert node[l, 0] != node[l, 1]
    assert torch.bincount(owner.flatten(), minlength=W).tolist() == [3] * W
    # A skewed layer may leave some ranks without any of its experts.
    skew = torch.zeros(2, 4, dtype=torch.float64)
    skew[0] = T([100.0, 0, 0, 0])
    skew[1] = T([1.0, 1, 1, 1])
    owner = heterogeneous_sharding(skew, 4, 2, 0)
    assert torch.bincount(owner.flatten(), minlength=4).tolist() == [2, 2, 2, 2]


def test_heterogeneous_sharding_bad_inputs():
    loads = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ranks_per_node"):
        heterogeneous_sharding(loads, 4, 3)
    with pytest.raises(ValueError, match="num_ranks"):
        heterogeneous_sharding(loads, 0, 1)
    with pytest.raises(ValueError, match="loads_LE"):
        heterogeneous_sharding(-loads, 4, 2)
    with pytest.raises(ValueError, match="loads_LE"):
        heterogeneous_sharding(torch.ones(4, dtype=torch.float64), 4, 2)
    with pytest.raises(ValueError, match="t_per_layer"):
        heterogeneous_sharding(loads, 4, 2, T([1, 2, 3]))
    with pytest.raises(ValueError, match="t_per_layer"):
        heterogeneous_sharding(loads, 4, 2, -1)


def test_reshard_moves_and_if_changed():
    old = T([[0, 0, 1, 1], [2, 2, 3, 3]])
    new = T([[0, 1, 1, 0], [2, 2, 3, 3]])
    assert reshard_moves(old, new) == [(0, 1, 0, 1), (0, 3, 1, 0)]
    assert reshard_moves(old, old) == []
    with pytest.raises(ValueError, match="new_owner_LE"):
        reshard_moves(old, new[:, :3])
    loads = T([[4.0, 3, 2, 1]], torch.float64)
    current = heterogeneous_sharding(loads, 2, 1, 0)
    assert reshard_if_changed(current, loads, 2, 1, 0) is None
    changed = reshard_if_changed(T([[0, 0, 1, 1]]), loads, 2, 1, 0)
    assert changed.tolist() == [[0, 1, 1, 0]]


def test_node_of_ranks():
    assert node_of_ranks(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="ranks_per_node"):
        node_of_ranks(6, 4)


# ---------------------------------------------------------------- simulator
def test_simulator_ranks_replication_above_ep_under_skew():
    from hecate.sim.fssdp import Workload, simulate

    cm = cost_model(intra_node_bw=50e9, inter_node_bw=10e9, chunk_bytes=4 * 10**6,
                    t_non_moe=2e-3, token_compute_s=2e-7, token_bytes=2048)
    wl = Workload(num_layers=1, num_experts=16, tokens_per_rank=2048, zipf_skew=1.5, seed=1)
    out = simulate(cm, wl, num_ranks=8, ranks_per_node=4, capacity_m=4, steps=4, reshard_every=2)
    assert out["overlap_degree"] == 5
    assert out["speedup_vs_ep"]["ep"] == 1.0
    assert out["speedup_vs_ep"]["hecate"] > 1.0
    assert out == simulate(cm, wl, num_ranks=8, ranks_per_node=4, capacity_m=4, steps=4,
                           reshard_every=2)  # deterministic
    with pytest.raises(ValueError, match="policies"):
        simulate(cm, wl, num_ranks=8, ranks_per_node=4, capacity_m=4, policies=("zero",))
