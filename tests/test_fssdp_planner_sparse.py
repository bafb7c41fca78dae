"""The sparse planner (TokenRoutes, fast Algorithm 1, vectorized byte fit, binary-search bins)
against the dense planner it replaced (tests/fssdp_reference_planner.py), on random cases.

Every stage must give exactly the reference's result: the same P1, the same routes cell by
cell, the same per-rank layouts and loads, the same balanced routes and the same bins.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.parallel.fssdp import (
    CostModel,
    HecatePolicy,
    ShadowingPolicy,
    TokenRoutes,
    balance_routes,
    build_plan,
    fit_holders,
    proportional_quota,
    route_tokens,
)
from hecate.parallel.fssdp.materialize import place_copies
from hecate.parallel.fssdp.strategy import FullyShardedSparse
from tests import fssdp_reference_planner as ref

SETTINGS = settings(max_examples=60, deadline=None)
CM = CostModel(intra_node_bw=4e9, inter_node_bw=1e9, chunk_bytes=10**5, t_non_moe=1e-3,
               token_compute_s=1e-6, token_bytes=512)


@st.composite
def cases(draw):
    """(holders, counts, nodes, owner, load): nodes may be numbered in any rank order."""
    num_nodes, rpn = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    W, E = num_nodes * rpn, draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nodes = np.arange(W) // rpn
    if draw(st.booleans()):
        nodes = rng.permutation(nodes)  # a node's ranks need not be contiguous
    owner = rng.integers(0, W, E)
    holders = rng.random((W, E)) < draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    holders[owner, np.arange(E)] = True
    kind = draw(st.sampled_from(["dense", "sparse", "hot", "tiny"]))
    if kind == "dense":
        counts = rng.integers(0, 200, (W, E))
    elif kind == "sparse":
        counts = rng.integers(0, 50, (W, E)) * (rng.random((W, E)) < 0.3)
    elif kind == "hot":
        counts = np.zeros((W, E), dtype=np.int64)
        counts[:, rng.integers(E)] = rng.integers(0, 1000, W)
    else:
        counts = rng.integers(0, 3, (W, E))  # fewer tokens than replicas: zero shares
    load = counts.sum(0).astype(np.float64)
    if draw(st.booleans()):
        load = np.round(load / max(load.max(), 1) * 3)  # many ties
    return holders, counts.astype(np.int64), nodes.astype(np.int64), owner.astype(np.int64), load


@SETTINGS
@given(cases())
def test_routes_layouts_and_loads_equal_the_dense_reference(case):
    holders, counts, nodes, _, _ = case
    want = ref.routes(holders, counts, nodes)
    routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.from_numpy(nodes))
    assert np.array_equal(routes.dense(), want)
    W = len(nodes)
    for rank in range(W):
        layout = routes.layout(rank)
        assert np.array_equal(layout.send_WE(), want[rank].T)
        assert np.array_equal(layout.recv_WE, want[:, :, rank])
        assert layout.send_splits == want[rank].sum(0).tolist()
        assert layout.recv_splits == want[:, :, rank].sum(1).tolist()
        keys = layout.send_e * W + layout.send_dst
        assert (np.diff(keys) > 0).all()  # sorted by (expert, destination), no duplicates
    loads = routes.rank_loads()
    same = nodes[:, None] == nodes[None, :]
    tokens_WW = want.sum(axis=1)
    np.fill_diagonal(tokens_WW, 0)
    assert np.array_equal(loads["served"], want.sum(axis=(0, 1)))
    assert np.array_equal(loads["send_intra"], (tokens_WW * same).sum(1))
    assert np.array_equal(loads["send_inter"], (tokens_WW * ~same).sum(1))
    assert np.array_equal(loads["recv_intra"], (tokens_WW * same).sum(0))
    assert np.array_equal(loads["recv_inter"], (tokens_WW * ~same).sum(0))
    owner = np.argmax(holders, axis=0)
    assert CM.plan_time(holders, owner, routes, nodes) == pytest.approx(
        ref.plan_time(CM, holders, owner, want, nodes), rel=1e-12)


@SETTINGS
@given(cases(), st.integers(0, 40), st.sampled_from([0.0, 0.02]))
def test_balanced_routes_equal_the_dense_reference(case, min_rows, tolerance):
    holders, counts, nodes, _, _ = case
    dense = ref.routes(holders, counts, nodes)
    want = ref.balance(dense, holders, nodes, tolerance, min_rows)
    routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.from_numpy(nodes))
    got = balance_routes(routes, tolerance=tolerance, min_rows=min_rows)
    assert isinstance(got, TokenRoutes) and np.array_equal(got.dense(), want)
    assert got.moved_tokens() == int(np.clip(want - dense, 0, None).sum())
    assert np.array_equal(got.rank_loads()["served"], want.sum(axis=(0, 1)))
    for rank in range(len(nodes)):
        assert np.array_equal(got.layout(rank).send_WE(), want[rank].T)
        assert np.array_equal(got.layout(rank).recv_WE, want[:, :, rank])


@SETTINGS
@given(cases(), st.integers(1, 5), st.integers(0, 12), st.booleans())
def test_algorithm1_and_byte_fit_equal_the_reference(case, m, t, predicted):
    holders_in, counts, nodes, owner, load = case
    W = len(nodes)
    quota = proportional_quota(load, W * m, W - 1)
    want = ref.place(load, owner, nodes, m, t, quota)
    got = HecatePolicy.place(load, owner, nodes, m, t)
    assert np.array_equal(got, want)
    fit_counts = counts / 3.0 if predicted else counts  # prefetch fits on mean (float) counts
    for start in (want, holders_in):
        for chunk_bytes, token_bytes, passes in ((4000, 10, 3), (300, 7, 2), (1, 0, 2)):
            expect = ref.fit_holders(start, owner, fit_counts, chunk_bytes, token_bytes, passes, m)
            fitted = fit_holders(torch.from_numpy(start), torch.from_numpy(owner),
                                 torch.from_numpy(np.asarray(fit_counts)), chunk_bytes=chunk_bytes,
                                 token_bytes=token_bytes, chunk_passes=passes, capacity_m=m)
            assert np.array_equal(fitted.numpy(), expect)


@settings(max_examples=25, deadline=None)
@given(cases(), st.integers(1, 4))
def test_cost_model_policies_match_the_reference_estimates(case, m):
    """Shadowing and calibration compare cost estimates: the sparse ones equal the dense ones
    (to rounding), so the same experts are shadowed."""
    _, counts, nodes, owner, _ = case
    counts_t, nodes_t, owner_t = torch.from_numpy(counts), torch.from_numpy(nodes), torch.from_numpy(owner)
    plan = build_plan(ShadowingPolicy(CM), counts_t.sum(0).double(), owner_t, counts_t, nodes_t, m)
    holders = plan.holders_WE.numpy()
    own = ref.owner_holders(owner, len(nodes))
    want = ref.plan_time(CM, holders, owner, ref.routes(holders, counts, nodes), nodes, hidden_s=0.0,
                         gathered_WE=holders & ~own)
    got = CM.plan_time(holders, owner, plan.routes, nodes, hidden_s=0.0, gathered_WE=holders & ~own)
    assert got == pytest.approx(want, rel=1e-12)
    calibrated = build_plan(HecatePolicy(CM, calibrate=True), counts_t.sum(0).double() + 1, owner_t,
                            counts_t, nodes_t, m)
    assert np.array_equal(calibrated.routes.dense(),
                          ref.routes(calibrated.holders_WE.numpy(), counts, nodes))


@SETTINGS
@given(cases(), st.integers(0, 2**16), st.integers(0, 40), st.integers(1, 3))
def test_destination_bins_equal_the_reference(case, seed, tokens, k):
    holders, counts, nodes, _, _ = case
    W, E = holders.shape
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, E, (tokens, k), generator=g)  # -1: a dropped entry
    counts[0] = torch.bincount(indices[indices >= 0], minlength=E).numpy()
    routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.from_numpy(nodes))
    layout = routes.layout(0)
    counts_E = torch.from_numpy(counts[0])
    want = ref.destination_bins(indices, counts_E, torch.from_numpy(layout.send_WE()))
    for compact in (True, False):  # the CPU (numpy) and the GPU (binary search) formulations
        got = FullyShardedSparse._destination_bins(indices, E, layout, compact=compact)
        assert torch.equal(got, want)


def test_bins_refuse_a_layout_that_does_not_match_the_local_routing():
    holders = np.ones((2, 3), dtype=np.bool_)
    routes = route_tokens(torch.from_numpy(holders), torch.tensor([[2, 0, 1], [0, 0, 0]]),
                          torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="counts disagree"):
        FullyShardedSparse._destination_bins(torch.tensor([[0, 1]]), 3, routes.layout(0))


def test_large_world_never_builds_dense_routes():
    """W=512, E=64: a layout and the loads in well under the 2 GiB a [W, E, W] int64 array needs
    (tracemalloc sees every numpy buffer)."""
    import tracemalloc

    W, E = 512, 64
    rng = np.random.default_rng(0)
    nodes = np.arange(W) // 8
    holders = np.zeros((W, E), dtype=np.bool_)
    holders[np.arange(E) % W, np.arange(E)] = True
    holders[rng.integers(0, W, 2 * W), rng.integers(0, E, 2 * W)] = True
    counts = rng.integers(0, 100, (W, E))
    tracemalloc.start()
    try:
        routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.from_numpy(nodes))
        layout = routes.layout(7)
        loads = routes.rank_loads()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * W * E * 8  # O(W*E) buffers, not W x W x E
    assert int(loads["served"].sum()) == int(counts.sum())
    assert sum(layout.send_splits) == int(counts[7].sum())


@pytest.mark.parametrize("E,routing", [(64, "uniform"), (64, "zipf"), (16, "zipf")])
def test_algorithm1_on_a_large_world_equals_the_reference(E, routing):
    """W=512 over 64 nodes: experts with more copies than nodes take the long-list path."""
    W, m = 512, 2
    rng = np.random.default_rng(E)
    p = np.ones(E) if routing == "uniform" else 1.0 / np.arange(1, E + 1) ** 1.2
    load = np.round(rng.permutation(p) * 1000)
    owner = np.arange(E) * 7 % W
    nodes = np.arange(W) // 8
    quota = proportional_quota(load, W * m, W - 1)
    want = ref.place(load, owner, nodes, m, 4 * m, quota)
    assert np.array_equal(HecatePolicy.place(load, owner, nodes, m, 4 * m), want)
    # The Python loop too (its long-list path runs only on worlds this large).
    share = load / (quota + 1)
    dev = np.zeros(W)
    np.add.at(dev, owner, share)
    order = np.lexsort((np.arange(E), -load, -quota))
    d, e = place_copies(dev, nodes, owner, order[quota[order] > 0], quota, share, m, use_kernel=False)
    got = ref.owner_holders(owner, W)
    got[d, e] = True
    assert np.array_equal(got, want)


@SETTINGS
@given(cases(), st.integers(1, 5))
def test_placement_kernel_and_python_loop_pick_the_same_copies(case, m):
    """csrc/cpu/placement.cpp and the Python loop of materialize.place_copies are one algorithm."""
    from hecate.ops._backend import use_extension

    _, _, nodes, owner, load = case
    W, E = len(nodes), len(load)
    quota = proportional_quota(load, W * m, W - 1)
    share = load / (quota + 1)
    dev = np.zeros(W)
    np.add.at(dev, owner, share)
    order = np.lexsort((np.arange(E), -load, -quota))
    order = order[quota[order] > 0]
    py = place_copies(dev, nodes, owner, order, quota, share, m, use_kernel=False)
    want = ref.place(load, owner, nodes, m, m + 1, quota)
    got = ref.owner_holders(owner, W)
    got[py[0], py[1]] = True
    assert np.array_equal(got, want)
    if not use_extension("place_copies", torch.device("cpu")):
        pytest.skip("hecate._C is not built (make build): only the Python loop was checked")
    kernel = place_copies(dev, nodes, owner, order, quota, share, m, use_kernel=True)
    assert np.array_equal(kernel[0], py[0]) and np.array_equal(kernel[1], py[1])
