"""The planner's C++ ops (csrc/cpu/placement.cpp place_experts, csrc/cpu/routes.cpp route_layout
and destination_bins) against the numpy / Python paths they stand in for, on random cases.

Every rank must compute the same plan whether or not it runs the ops, so each op must give
exactly (bit for bit) what the Python path gives: the same P1 (Algorithm 1 with its float
quota), the same per-rank layouts and the same bins. Skipped where hecate._C is not built.
"""
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.ops._backend import use_extension
from hecate.parallel.fssdp import HecatePolicy, fit_holders, route_tokens
from hecate.parallel.fssdp import routes as routes_module
from hecate.parallel.fssdp.strategy import _host_bins

pytestmark = pytest.mark.skipif(not use_extension("route_layout", torch.device("cpu")),
                                reason="hecate._C is not built (make build)")
SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def worlds(draw):
    """(nodes, owner, load): up to 70 ranks on nodes of 1-8 ranks (any order), up to 300 experts,
    loads from integer counts (ties) or floats (the quota's rounding), some experts idle."""
    rpn = draw(st.sampled_from([1, 2, 4, 8]))
    W = rpn * draw(st.integers(1, 9))
    E = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nodes = np.arange(W) // rpn
    if draw(st.booleans()):
        nodes = rng.permutation(nodes)
    p = rng.permutation(1.0 / np.arange(1, E + 1) ** draw(st.sampled_from([0.0, 0.8, 1.2, 2.5])))
    kind = draw(st.sampled_from(["counts", "float", "ties", "idle"]))
    if kind == "counts":
        load = rng.multinomial(int(rng.integers(1, 20000)), p / p.sum()).astype(np.float64)
    elif kind == "float":
        load = p * rng.random() * 1e4 / 3  # not integers: the shares' rounding matters
    elif kind == "ties":
        load = np.round(p / p.max() * 3)
    else:
        load = np.where(rng.random(E) < 0.5, 0.0, p * 100)
    owner = rng.integers(0, W, E)
    return nodes.astype(np.int64), owner.astype(np.int64), load


@SETTINGS
@given(worlds(), st.integers(1, 6), st.integers(0, 30))
def test_place_experts_op_equals_the_python_algorithm1(world, m, t):
    nodes, owner, load = world
    want = HecatePolicy.place(load, owner, nodes, m, t, use_kernel=False)
    got = HecatePolicy.place(load, owner, nodes, m, t, use_kernel=True)
    assert got.dtype == np.bool_ and np.array_equal(got, want)


def test_place_experts_op_on_a_large_world():
    """W=1024 over 128 nodes, E=256 skewed: the free-rank list is merged many times."""
    rng = np.random.default_rng(3)
    W, E, m = 1024, 256, 2
    load = rng.permutation(1.0 / np.arange(1, E + 1) ** 1.2) * 1e5 / 7
    nodes = np.arange(W) // 8
    owner = np.arange(E) * 4 % W
    want = HecatePolicy.place(load, owner, nodes, m, 4 * m, use_kernel=False)
    assert np.array_equal(HecatePolicy.place(load, owner, nodes, m, 4 * m, use_kernel=True), want)


def _python_routes(*args):
    with mock.patch.object(routes_module, "use_extension", lambda *a: False):
        return route_tokens(*args)


@SETTINGS
@given(worlds(), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_route_layout_op_equals_the_numpy_layout(world, seed, density):
    nodes, owner, _ = world
    W, E = len(nodes), len(owner)
    rng = np.random.default_rng(seed)
    holders = rng.random((W, E)) < density
    holders[owner, np.arange(E)] = True
    counts = rng.integers(0, 40, (W, E)) * (rng.random((W, E)) < 0.7)
    args = torch.from_numpy(holders), torch.from_numpy(counts.astype(np.int64)), torch.from_numpy(nodes)
    fast, slow = route_tokens(*args), _python_routes(*args)
    assert fast._tensors is not None and slow._tensors is None  # the op ran, and the numpy path
    assert fast.num_holders == slow.num_holders == int(holders.sum())
    for rank in sorted({0, W - 1, int(rng.integers(W))}):
        a, b = fast.layout(rank), slow.layout(rank)
        for name in ("send_e", "send_dst", "send_tokens", "recv_WE"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.send_splits == b.send_splits and a.recv_splits == b.recv_splits
        # Its bins equal the numpy bins, dropped entries (-1) included.
        ids = np.repeat(np.arange(E), counts[rank])
        ids = rng.permutation(np.concatenate((ids, -np.ones(int(rng.integers(0, 4)), dtype=np.int64))))
        indices = torch.from_numpy(ids).view(-1, 1)
        want = _host_bins(indices, E, b, b.send_dst * E + b.send_e)
        assert np.array_equal(a.destination_bins(indices, E).numpy(), want)
        assert np.array_equal(b.destination_bins(indices, E).numpy(), want)  # numpy-made layout
    # A layout made with the routes (route_tokens(..., rank=)) is the same, and so is the next.
    rank = int(rng.integers(W))
    early = route_tokens(*args, rank=rank)
    assert early.num_holders == slow.num_holders
    for _ in range(2):
        a, b = early.layout(rank), slow.layout(rank)
        assert all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("send_e", "send_dst", "send_tokens",
                                                                          "recv_WE"))
        assert a.send_splits == b.send_splits and a.recv_splits == b.recv_splits
    # What needs every rank (loads) comes from the numpy index, built on first use.
    for name, value in slow.rank_loads().items():
        assert np.array_equal(fast.rank_loads()[name], value), name


def test_route_ops_reject_bad_inputs_with_clear_errors():
    holders = torch.tensor([[True, False], [False, False]])
    counts = torch.tensor([[1, 0], [0, 3]])
    nodes = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="no holder of expert 1 but rank 1 routes 3 tokens"):
        route_tokens(holders, counts, nodes)
    for rank in (None, 1):
        with pytest.raises(ValueError, match="non-negative"):
            route_tokens(holders, torch.tensor([[1, 0], [-2, 0]]), nodes, rank=rank)
        with pytest.raises(ValueError, match="no holder of expert 1 but rank 1 routes 3 tokens"):
            route_tokens(holders, counts, nodes, rank=rank)
    routes = route_tokens(holders, torch.tensor([[1, 0], [2, 0]]), nodes)
    layout = routes.layout(1)  # rank 1 sends its 2 tokens of expert 0 to rank 0
    with pytest.raises(RuntimeError, match="the plan routes 2 entries of rank 1 but it has 3"):
        layout.destination_bins(torch.tensor([[0], [0], [0]]), 2)
    with pytest.raises(ValueError, match="indices has expert 5 but the layer has 2 experts"):
        layout.destination_bins(torch.tensor([[0], [5]]), 2)
    # Two destinations for expert 0 (ranks 0 and 1 on one node hold it; rank 2 sends to both).
    split = route_tokens(torch.tensor([[True], [True], [False]]), torch.tensor([[0], [0], [4]]),
                         torch.tensor([0, 0, 0])).layout(2)
    assert split.send_tokens.tolist() == [2, 2]
    assert split.destination_bins(torch.tensor([0, 0, 0, 0]), 1).tolist() == [0, 0, 1, 1]
    with pytest.raises(RuntimeError, match="the plan routes 4 entries of rank 2 but it has 5"):
        split.destination_bins(torch.tensor([0, 0, 0, 0, 0]), 1)


@SETTINGS
@given(worlds(), st.integers(0, 2**32 - 1), st.integers(1, 5), st.booleans(),
       st.sampled_from([0.0, 1e5, 1e7, 1e9]))
def test_fit_replicas_op_equals_the_numpy_fit(world, seed, m, predicted, fixed_bytes):
    """Real (int) or predicted (float) counts, with and without the collectives' fixed cost."""
    nodes, owner, _ = world
    W, E = len(nodes), len(owner)
    rng = np.random.default_rng(seed)
    holders = rng.random((W, E)) < rng.choice([0.0, 0.1, 0.5])
    holders[owner, np.arange(E)] = True
    counts = rng.integers(0, 400, (W, E)) * (rng.random((W, E)) < 0.5)
    counts = torch.from_numpy(counts / 3.0 if predicted else counts.astype(np.int64))
    sizes = dict(chunk_bytes=int(rng.choice([1000, 6000, 20000])), token_bytes=int(rng.choice([0, 8, 64])),
                 chunk_passes=int(rng.choice([2, 3])), capacity_m=m, fixed_bytes=fixed_bytes)
    args = torch.from_numpy(holders), torch.from_numpy(owner), counts
    want = fit_holders(*args, use_kernel=False, **sizes)
    got = fit_holders(*args, use_kernel=True, **sizes)
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_fit_replicas_op_rejects_bad_counts():
    holders, owner = torch.tensor([[True, False]]), torch.tensor([0, 0])
    sizes = dict(chunk_bytes=10, token_bytes=8, chunk_passes=2, capacity_m=1)
    with pytest.raises(ValueError, match="counts_WE must be non-negative, found -1"):
        fit_holders(holders, owner, torch.tensor([[3, -1]]), use_kernel=True, **sizes)
    with pytest.raises(ValueError, match="finite"):
        fit_holders(holders, owner, torch.tensor([[3.0, float("nan")]]), use_kernel=True, **sizes)
    with pytest.raises(ValueError, match="owner_E entries must be ranks in \\[0, 1\\)"):
        fit_holders(holders, torch.tensor([0, 2]), torch.tensor([[3, 1]]), use_kernel=True, **sizes)
