"""When the replicas would not repay the collectives they add, fssdp takes ep's path.

`collective_latency_s` (FssdpOptions) charges each collective a layer's replicas add (spAG,
spRS, the re-gather) a fixed latency, priced in bytes; the byte fit then keeps the layer's
replicas only if together they save more than that. Here every rank routes ~2000 tokens over
12 small experts (near balanced), so by bytes alone replicas pay (checked: with latency 0 the
plan replicates), but not by the gloo default latency: P1 = P0, and the layer must then move
exactly ep's token bytes on every rank, issue exactly ep's collectives (one count exchange and
the four token all-to-alls; no spAG / spRS), and still compute what one process computes.
"""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.parallel.dense import all_reduce_dense_gradients
from hecate.testing import run_distributed
from tests.collective_spy import layer_step
from tests.test_strategies_layer import _config, _inputs, _oracle

_TOKENS = ("dispatch", "combine", "dispatch.backward", "combine.backward")


def _run(rank, world, strategy, options, counts, seed):
    """One MoE layer's forward + backward: CommStats, the torch.distributed collectives it
    issued (forward, backward, finish_backward), the plan's replicas, and (got, want) pairs
    against the single-process oracle."""
    torch.manual_seed(seed)
    base = MoELayer(_config(2, None))
    ref = copy.deepcopy(base)
    xs, gs = _inputs(world, counts, seed + 1)
    ref_out, ref_xgrad = _oracle(ref, xs, gs)
    topo = Topology()
    layer = parallelize(copy.deepcopy(base), build_strategy(strategy, topo, **options))
    x = xs[rank].clone().requires_grad_(True)
    out, calls = layer_step(layer, x, gs[rank])
    stats = topo.stats.snapshot()
    all_reduce_dense_gradients(layer)
    sl = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
    pairs = {
        "y": (out.y, ref_out.y[sl]),
        "x_grad": (x.grad / world, ref_xgrad[sl]),
        "router_grad": ([p.grad for p in layer.router.parameters()], [p.grad for p in ref.router.parameters()]),
        "expert_grads": (layer.strategy.gather_experts(layer, grads=True),
                         {n: p.grad for n, p in ref.experts.named_parameters()}),
        "aux": (out.aux_loss, None),
        "ref_aux": ref_out.aux_loss,
    }
    replicas = layer.fssdp_state.last_plan.num_replicas if strategy == "fssdp" else 0
    return {"stats": stats, "calls": calls, "replicas": replicas, "pairs": pairs}


def ep_path_case(rank, world, counts, seed):
    return {label: _run(rank, world, strategy, options, counts, seed) for label, strategy, options in (
        ("ep", "ep", {}),
        ("bytes_only", "fssdp", {"collective_latency_s": 0.0}),
        ("latency", "fssdp", {"collective_latency_s": None}),  # the backend's (gloo) default
    )}


@pytest.mark.parametrize("world", [2, 3])
def test_replicas_that_do_not_repay_their_collectives_leave_fssdp_on_eps_path(world):
    counts = [600, 560, 640][:world]
    results = run_distributed(ep_path_case, world, counts, 3, timeout=240)
    for rank, r in enumerate(results):
        ep, by_bytes, fssdp = r["ep"], r["bytes_only"], r["latency"]
        assert by_bytes["replicas"] > 0, f"rank {rank}: by bytes alone no replica paid; not the intended case"
        assert any(n.startswith("fssdp.sp") for n in by_bytes["stats"])
        assert fssdp["replicas"] == 0, f"rank {rank}: a replica was kept although it cannot repay its collectives"
        assert not any(n.startswith("fssdp.sp") for n in fssdp["stats"]), sorted(fssdp["stats"])
        for part in _TOKENS:
            for side in ("sent", "received"):
                assert fssdp["stats"][f"fssdp.{part}"][side] == ep["stats"][f"ep.{part}"][side], (rank, part, side)
                assert fssdp["stats"][f"fssdp.{part}"][side] > 0
        # ep: counts all-to-all + 4 token all-to-alls; fssdp: counts all-gather + the same 4.
        assert len(fssdp["calls"]) == len(ep["calls"]) == 5, (rank, fssdp["calls"], ep["calls"])
        assert fssdp["calls"].count("all_to_all_single") == 4
    for label in ("ep", "bytes_only", "latency"):
        _check([r[label]["pairs"] for r in results], label)


def test_fit_keeps_replicas_only_when_their_saving_exceeds_the_fixed_cost():
    from hecate.parallel.fssdp.materialize import fit_holders

    owner = torch.tensor([0, 1])
    counts = torch.tensor([[0, 30], [10, 0]])  # rank 0 routes 30 entries to expert 1 (owned by 1)
    proposed = torch.ones(2, 2, dtype=torch.bool)
    fit = dict(chunk_bytes=100, token_bytes=4, chunk_passes=3, capacity_m=1)
    saving = 4 * 30 * 4 - 3 * 100  # 180 bytes: the only replica that pays by bytes (expert 0: 160 < 300)
    by_bytes = fit_holders(proposed, owner, counts, **fit)
    assert by_bytes.tolist() == [[True, True], [False, True]]
    assert fit_holders(proposed, owner, counts, fixed_bytes=saving - 1, **fit).equal(by_bytes)
    p0 = [[True, False], [False, True]]
    assert fit_holders(proposed, owner, counts, fixed_bytes=saving, **fit).tolist() == p0
    assert fit_holders(proposed, owner, counts.double(), fixed_bytes=10 * saving, **fit).tolist() == p0


def _check(results, label):
    """Like test_strategies_layer._check, with an absolute tolerance for sums over ~6000 tokens."""
    aux = torch.stack([r["aux"][0] for r in results]).mean()
    torch.testing.assert_close(aux, results[0]["ref_aux"], rtol=1e-5, atol=1e-6)
    for r in results:
        for key in ("y", "x_grad"):
            torch.testing.assert_close(*r[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} {key}: {m}")
        for got, want in zip(*r["router_grad"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} router: {m}")
        got, want = r["expert_grads"]
        assert set(got) == set(want)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} {n}: {m}")
