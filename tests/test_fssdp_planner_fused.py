"""planner.plan_layer (one call: counts' totals, P1, byte fit, routes + this rank's layout, spAG
plan) gives exactly the plan of the staged calls it replaced in FullyShardedSparse.plan
(HecatePolicy.place, fit_holders, route_tokens, plan_sparse), with the C++ op and with its
numpy fallback, on random worlds (uniform and skewed counts, one and several nodes, P1 with
and without replicas, P1 placed or given); and the runtime's plan keeps its load history."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hecate.ops._backend as backend
import hecate.parallel.fssdp.routes as routes_mod
from hecate.comm.sparse import plan_sparse
from hecate.ops._backend import use_extension
from hecate.parallel.fssdp import HecatePolicy, LoadPredictor, balance_routes, fit_holders, node_of_ranks, route_tokens
from hecate.parallel.fssdp.planner import ReplicaFit, history_buffer, plan_layer

needs_ext = pytest.mark.skipif(not use_extension("plan_layer", torch.device("cpu")),
                               reason="hecate._C is not built")
SPARSE_FIELDS = ("send_ids", "recv_ids", "owned_ids", "held_ids", "send_rows", "recv_rows", "owned_rows_M")


def _case(rng, W, E, skewed):
    """Random inputs of one layer's step: counts [W, E] (some zero), owners, nodes, m, t, fit."""
    tokens = int(rng.integers(0, 600))
    p = np.ones(E) if not skewed else 1.0 / np.arange(1, E + 1) ** rng.uniform(0.8, 2.0)
    p = rng.permutation(p / p.sum())
    counts = rng.multinomial(tokens, p, size=W).astype(np.int64)
    counts[rng.random((W, E)) < 0.1] = 0
    per_node = [d for d in range(1, W + 1) if W % d == 0]
    nodes = node_of_ranks(W, int(rng.choice(per_node)))
    owner = torch.from_numpy(rng.integers(0, W, E).astype(np.int64))
    m = int(rng.integers(1, 5))
    t = int(rng.integers(0, 3 * m + 1))
    load = torch.from_numpy(rng.multinomial(tokens * W + 1, p).astype(np.float64) * rng.uniform(0.5, 2.0))
    fit = None
    if rng.random() < 0.7:  # a break-even between 0 and ~all tokens: some replicas pay, some not
        fit = ReplicaFit(chunk_bytes=int(rng.integers(1, 4 * tokens // max(E, 1) + 3)), token_bytes=1,
                         chunk_passes=int(rng.integers(2, 4)),
                         fixed_bytes=float(rng.choice([0.0, rng.uniform(0, 4 * tokens)])))
    holders = None
    if rng.random() < 0.3:  # a given P1 (early, prefetched or another policy's): P0 plus random cells
        h = rng.random((W, E)) < rng.uniform(0, 0.3)
        h[owner.numpy(), np.arange(E)] = True
        holders = torch.from_numpy(h)
    return dict(counts=torch.from_numpy(counts), owner=owner, nodes=nodes, m=m, t=t, load=load, fit=fit,
                holders=holders, rank=int(rng.integers(0, W)))


def _staged(c, use_kernel):
    """FullyShardedSparse.plan's calls before the fused one."""
    holders = c["holders"]
    if holders is None:
        holders = torch.from_numpy(HecatePolicy.place(c["load"].numpy(), c["owner"].numpy(), c["nodes"].numpy(),
                                                      c["m"], c["t"], use_kernel=use_kernel))
    if c["fit"] is not None:
        f = c["fit"]
        holders = fit_holders(holders, c["owner"], c["counts"], chunk_bytes=f.chunk_bytes, token_bytes=f.token_bytes,
                              chunk_passes=f.chunk_passes, capacity_m=c["m"], fixed_bytes=f.fixed_bytes,
                              use_kernel=use_kernel)
    routes = route_tokens(holders, c["counts"], c["nodes"], rank=c["rank"])
    sparse = plan_sparse(c["owner"], holders, c["rank"]) if routes.num_holders > holders.shape[1] else None
    return holders, routes, sparse


def _fused(c, use_kernel):
    hist = torch.full(c["counts"].shape, -1.0, dtype=torch.float64)
    laid = plan_layer(c["counts"], c["owner"], c["nodes"], c["rank"], capacity_m=c["m"],
                      load_E=None if c["holders"] is not None else c["load"],
                      overlap_degree=None if c["holders"] is not None else c["t"], holders_WE=c["holders"],
                      fit=c["fit"], sparse=True, history_out=hist, use_kernel=use_kernel)
    assert torch.equal(hist, c["counts"].double())
    assert torch.equal(laid.counts_E, c["counts"].sum(0))
    return laid


def _assert_same(c, laid, staged):
    holders, routes, sparse = staged
    plan, rank = laid.plan, c["rank"]
    assert torch.equal(plan.holders_WE, holders)
    assert torch.equal(plan.owner_E, c["owner"])
    assert plan.routes.num_holders == routes.num_holders
    got, want = plan.rank_layout(rank), routes.layout(rank)
    for name in ("send_e", "send_dst", "send_tokens", "recv_WE"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.send_splits == want.send_splits and got.recv_splits == want.recv_splits
    other = (rank + 1) % plan.world_size  # the routes serve any rank's layout afterwards too
    np.testing.assert_array_equal(plan.rank_layout(other).recv_WE, routes.layout(other).recv_WE)
    for name, v in plan.rank_loads().items():
        np.testing.assert_array_equal(v, routes.rank_loads()[name], err_msg=name)
    assert (laid.sparse is None) == (sparse is None)
    if sparse is not None:
        for name in SPARSE_FIELDS:
            assert torch.equal(getattr(laid.sparse, name), getattr(sparse, name)), name
        assert laid.sparse.send_counts == sparse.send_counts and laid.sparse.recv_counts == sparse.recv_counts


def _numpy_only(monkeypatch):
    """No hecate._C anywhere in the staged path (routes and plan_sparse pick their kernels)."""
    monkeypatch.setattr(routes_mod, "use_extension", lambda *a: False)
    monkeypatch.setattr(backend, "use_extension", lambda *a: False)


@needs_ext
@pytest.mark.parametrize("seed", range(6))
def test_fused_op_equals_the_staged_calls(seed):
    rng = np.random.default_rng(seed)
    replicas = 0
    for i in range(40):
        W = int(rng.choice([1, 2, 3, 4, 8, 16, 32, 64]))
        E = int(rng.choice([1, 2, 5, 8, 16, 64, 256]))
        c = _case(rng, W, E, skewed=bool(i % 2))
        laid = _fused(c, use_kernel=True)
        _assert_same(c, laid, _staged(c, use_kernel=True))
        replicas += laid.plan.num_replicas > 0
    assert 5 < replicas < 40  # both kinds of plans were compared


@pytest.mark.parametrize("seed", range(3))
def test_numpy_fallback_equals_the_staged_numpy_calls(seed, monkeypatch):
    rng = np.random.default_rng(100 + seed)
    cases = [_case(rng, int(rng.choice([1, 3, 8, 16, 64])), int(rng.choice([2, 8, 64, 256])), bool(i % 2))
             for i in range(15)]
    fused_ext = [_fused(c, use_kernel=True) for c in cases] if use_extension("plan_layer", torch.device("cpu")) else []
    _numpy_only(monkeypatch)
    for i, c in enumerate(cases):
        laid = _fused(c, use_kernel=False)
        _assert_same(c, laid, _staged(c, use_kernel=False))
        if fused_ext:  # the op and the fallback: the same plan on ranks with and without hecate._C
            assert torch.equal(laid.plan.holders_WE, fused_ext[i].plan.holders_WE)


@needs_ext
@pytest.mark.parametrize("skewed", [False, True])
def test_fused_op_at_1024_ranks(skewed):
    rng = np.random.default_rng(7 + skewed)
    W, E = 1024, 256
    c = _case(rng, W, E, skewed)
    c.update(holders=None, m=2 * E // W + 2, t=8, counts=torch.from_numpy(
        rng.multinomial(4096, (np.ones(E) if not skewed else 1.0 / np.arange(1, E + 1) ** 1.2) /
                        (E if not skewed else (1.0 / np.arange(1, E + 1) ** 1.2).sum()), size=W).astype(np.int64)),
        fit=ReplicaFit(chunk_bytes=5, token_bytes=1, chunk_passes=3), nodes=node_of_ranks(W, 8))
    c["load"] = c["counts"].sum(0).double()
    laid = _fused(c, use_kernel=True)
    _assert_same(c, laid, _staged(c, use_kernel=True))
    assert laid.plan.num_replicas > 0


@needs_ext
def test_balanced_routes_from_the_fused_plan_equal_the_staged_ones():
    rng = np.random.default_rng(3)
    for _ in range(10):
        c = _case(rng, 8, 16, skewed=True)
        c.update(holders=None, fit=None, t=6, m=3, nodes=node_of_ranks(8, 4))
        laid = _fused(c, use_kernel=True)
        _, routes, _ = _staged(c, use_kernel=True)
        got, want = balance_routes(laid.plan.routes), balance_routes(routes)
        np.testing.assert_array_equal(got.moves, want.moves)
        np.testing.assert_array_equal(got.layout(c["rank"]).recv_WE, want.layout(c["rank"]).recv_WE)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_bad_inputs_raise_clear_errors(use_kernel):
    if use_kernel and not use_extension("plan_layer", torch.device("cpu")):
        pytest.skip("hecate._C is not built")
    counts = torch.ones(2, 3, dtype=torch.int64)
    counts[1, 2] = -4
    owner, nodes = torch.tensor([0, 1, 0]), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="counts_WE must be non-negative, found -4"):
        plan_layer(counts, owner, nodes, 0, capacity_m=1, load_E=torch.ones(3, dtype=torch.float64),
                   overlap_degree=0, use_kernel=use_kernel)
    with pytest.raises(ValueError, match="needs holders_WE"):
        plan_layer(counts.abs(), owner, nodes, 0, capacity_m=1, use_kernel=use_kernel)
    with pytest.raises(ValueError, match="node_of_W must number nodes"):
        plan_layer(counts.abs(), owner, torch.tensor([0, 2]), 0, capacity_m=1,
                   load_E=torch.ones(3, dtype=torch.float64), overlap_degree=0, use_kernel=use_kernel)


def test_history_buffer_reuses_the_entry_the_window_evicts():
    from collections import deque

    hist = deque(maxlen=2)
    counts = torch.ones(3, 4, dtype=torch.int64)
    first = history_buffer(hist, counts)
    hist.append(first)
    hist.append(history_buffer(hist, counts))
    assert history_buffer(hist, counts) is first  # full: the oldest is reused
    assert history_buffer(hist, torch.ones(2, 4, dtype=torch.int64)) is not first  # another shape


def test_runtime_plan_keeps_the_history_and_prediction_of_the_staged_path():
    """FullyShardedSparse.plan (through the simulator's replay: the runtime code without its
    collectives) over more steps than the window: rank_history holds the last `window` counts
    as float64, the predictor the same predictions as one fed the counts directly."""
    from hecate.sim.plans import FssdpReplay

    W, E, window = 8, 16, 3
    replay = FssdpReplay(W, 4, E, 1000, 1, window=window, overlap_degree=6, prefetch=False)
    ref = LoadPredictor(E, window)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(7):
        counts = rng.multinomial(400, np.arange(1, E + 1) / (E * (E + 1) / 2), size=W).astype(np.int64)
        plan = replay.step([counts], token_bytes=8)[0].plan
        ref.update_from_rank_counts(counts)
        seen.append(counts)
        state = replay.layers[0].fssdp_state
        assert [h.tolist() for h in state.rank_history] == [c.astype(np.float64).tolist() for c in seen[-window:]]
        assert torch.equal(state.predictor.predict(), ref.predict())
        assert torch.equal(state.observed_E, torch.from_numpy(counts.sum(0)))
        assert torch.equal(plan.routes.counts_WE if isinstance(plan.routes.counts_WE, torch.Tensor)
                           else torch.from_numpy(plan.routes.counts_WE), torch.from_numpy(counts))


def test_policy_checks_run_again_after_an_in_place_change():
    """materialize's check cache (the same owners / load tensors are planned with several times
    a step) is keyed on the tensor's version: an in-place change is checked again."""
    policy = HecatePolicy(overlap_degree=2)
    load, owner, nodes = torch.ones(4, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), torch.zeros(2, dtype=torch.int64)
    first = policy.plan(load, owner, nodes, 2)
    assert torch.equal(policy.plan(load, owner, nodes, 2), first)  # cached checks, same P1
    owner[3] = 5
    with pytest.raises(ValueError, match=r"owner_E entries must be ranks in \[0, 2\)"):
        policy.plan(load, owner, nodes, 2)
    owner[3] = 1
    load[0] = -1.0
    with pytest.raises(ValueError, match="predicted_load_E must be non-negative"):
        policy.plan(load, owner, nodes, 2)


@needs_ext
def test_runtime_plans_agree_with_and_without_the_extension(monkeypatch):
    """FullyShardedSparse.plan on ranks with hecate._C (plan_layer's op) and without it (its
    numpy fallback) gives the same plans step after step: P1 (with replicas fitted and
    pruned), this rank's layout, the history and the predictions."""
    import hecate._extension as extension
    from hecate.sim.plans import FssdpReplay

    W, E = 8, 16
    rng = np.random.default_rng(5)
    steps = [rng.multinomial(600, 1.0 / np.arange(1, E + 1) ** 1.5 / (1.0 / np.arange(1, E + 1) ** 1.5).sum(),
                             size=W).astype(np.int64) for _ in range(6)]

    def run():
        replay = FssdpReplay(W, 4, E, 50, 2, window=3, overlap_degree=5, prefetch=True, collective_latency_s=0.0)
        out = []
        for counts in steps:
            for lp in replay.step([counts, counts[::-1].copy()], token_bytes=8):
                lay = lp.plan.rank_layout(0)
                out.append((lp.plan.holders_WE.clone(), lay.send_e.copy(), lay.send_dst.copy(),
                            lay.send_tokens.copy(), lay.recv_WE.copy()))
            state = replay.layers[1].fssdp_state
            out.append((state.predictor.predict().clone(), torch.stack(list(state.rank_history))))
        return out

    with_ext = run()
    monkeypatch.setattr(extension, "_loaded", False)
    assert not use_extension("plan_layer", torch.device("cpu"))
    without = run()
    assert any(int(item[0].sum()) > E for item in with_ext if item[0].dtype == torch.bool)  # replicas
    for a, b in zip(with_ext, without, strict=True):
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y))
