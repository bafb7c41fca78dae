"""Property tests (hypothesis) of the FSSDP planners: invariants over random inputs."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.parallel.fssdp import (
    CostModel,
    HecatePolicy,
    NoReplicationPolicy,
    ShadowingPolicy,
    build_plan,
    heterogeneous_sharding,
    node_of_ranks,
    slots_per_rank,
    token_routes,
)

SETTINGS = settings(max_examples=40, deadline=None)
CM = CostModel(intra_node_bw=4e9, inter_node_bw=1e9, chunk_bytes=10**6, t_non_moe=3e-3,
               token_compute_s=1e-5, token_bytes=2048)


@st.composite
def worlds(draw):
    """(W, ranks_per_node, E, owner_E, counts_WE) with a skew chosen by the draw."""
    nodes = draw(st.integers(1, 3))
    rpn = draw(st.integers(1, 3))
    W = nodes * rpn
    E = draw(st.integers(1, 10))
    owner = torch.tensor(draw(st.lists(st.integers(0, W - 1), min_size=E, max_size=E)))
    kind = draw(st.sampled_from(["uniform", "one_hot_expert", "zipf", "one_rank", "random"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        counts = np.full((W, E), draw(st.integers(0, 50)))
    elif kind == "one_hot_expert":
        counts = np.zeros((W, E), dtype=np.int64)
        counts[:, rng.integers(E)] = rng.integers(0, 500, size=W)
    elif kind == "zipf":
        p = 1.0 / np.arange(1, E + 1) ** 1.3
        counts = np.stack([rng.multinomial(200, p / p.sum()) for _ in range(W)])
    elif kind == "one_rank":
        counts = np.zeros((W, E), dtype=np.int64)
        counts[rng.integers(W)] = rng.integers(0, 300, size=E)
    else:
        counts = rng.integers(0, 100, size=(W, E))
    return W, rpn, E, owner, torch.from_numpy(np.asarray(counts, dtype=np.int64))


def policies(draw_t):
    return [HecatePolicy(overlap_degree=draw_t), HecatePolicy(CM, calibrate=True),
            ShadowingPolicy(CM), NoReplicationPolicy()]


def check_routes(holders, counts, nodes, routes):
    W, E = holders.shape
    assert routes.shape == (W, E, W) and routes.dtype == torch.int64 and (routes >= 0).all()
    assert torch.equal(routes.sum(-1), counts)  # conservation
    assert not (routes > 0)[~holders.T.unsqueeze(0).expand(W, E, W)].any()  # only holders serve
    for s in range(W):
        same_node = nodes == nodes[s]
        for e in range(E):
            if counts[s, e] == 0:
                continue
            if holders[s, e]:
                chosen = torch.arange(W) == s  # local first: everything stays home
            elif (holders[:, e] & same_node).any():
                chosen = holders[:, e] & same_node
            else:
                chosen = holders[:, e].clone()
            row = routes[s, e]
            assert row[~chosen].sum() == 0
            share = row[chosen]
            assert share.max() - share.min() <= 1  # even split within one token


@SETTINGS
@given(worlds(), st.integers(0, 12), st.integers(1, 4))
def test_policies_superset_of_owners_capacity_and_determinism(world, t, m):
    W, rpn, E, owner, counts = world
    nodes = node_of_ranks(W, rpn)
    load = counts.sum(0).double()
    own = torch.zeros(W, E, dtype=torch.bool)
    own[owner, torch.arange(E)] = True
    for policy in policies(t):
        holders = policy.plan(load, owner, nodes, m, counts_WE=counts)
        assert holders.dtype == torch.bool and holders.shape == (W, E)
        assert not (own & ~holders).any()
        extra = holders & ~own
        if isinstance(policy, HecatePolicy):
            assert (extra.sum(1) <= m).all()  # memory budget per rank
        if isinstance(policy, ShadowingPolicy):
            shadowed = extra.any(0)
            assert shadowed.sum() <= m
            assert (holders[:, shadowed]).all()  # shadowing is all-or-nothing
        again = type(policy).__new__(type(policy))
        again.__dict__.update(policy.__dict__)
        assert torch.equal(again.plan(load, owner, nodes, m, counts_WE=counts), holders)


@SETTINGS
@given(worlds(), st.integers(0, 12), st.integers(1, 4))
def test_routes_invariants_on_planned_placements(world, t, m):
    W, rpn, E, owner, counts = world
    nodes = node_of_ranks(W, rpn)
    for policy in policies(t):
        plan = build_plan(policy, counts.sum(0).double(), owner, counts, nodes, m)
        check_routes(plan.holders_WE, counts, nodes, plan.routes_WEW)
        again = build_plan(policy, counts.sum(0).double(), owner, counts, nodes, m)
        assert again.digest() == plan.digest()


@SETTINGS
@given(worlds(), st.integers(0, 2**16))
def test_routes_invariants_on_random_placements(world, seed):
    W, rpn, E, owner, counts = world
    nodes = node_of_ranks(W, rpn)
    g = torch.Generator().manual_seed(seed)
    holders = torch.rand(W, E, generator=g) < 0.4
    holders[owner, torch.arange(E)] = True
    routes = token_routes(holders, counts, nodes)
    check_routes(holders, counts, nodes, routes)
    assert torch.equal(token_routes(holders, counts, nodes), routes)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 5), st.integers(0, 2**16), st.booleans())
def test_sharding_one_owner_equal_slots_determinism(L, E, nodes, rpn, t, seed, ties):
    W = nodes * rpn
    rng = np.random.default_rng(seed)
    loads = rng.integers(0, 3, size=(L, E)) if ties else rng.zipf(1.5, size=(L, E))
    loads = torch.from_numpy(loads.astype(np.float64))
    owner = heterogeneous_sharding(loads, W, rpn, t)
    assert owner.shape == (L, E) and owner.dtype == torch.int64
    assert ((owner >= 0) & (owner < W)).all()  # every chunk exactly one owner
    per_rank = torch.bincount(owner.flatten(), minlength=W)
    assert per_rank.tolist() == slots_per_rank(L * E, W, rpn).tolist()
    assert per_rank.max() - per_rank.min() <= 1
    assert torch.equal(heterogeneous_sharding(loads.clone(), W, rpn, t), owner)
