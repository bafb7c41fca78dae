"""Dense parameters with a sharded optimizer (ZeRO-1, parallel.dense_optimizer): AdamW state
for 1/W of the dense parameters per rank, the same training as one process, the same bytes
as the all-reduce, and checkpoints that move between sharded and replicated layouts."""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.testing import run_distributed
from hecate.train.engine import Engine
from tests.training_cases import batch, tiny_config, train_case


def _dense_state_case(rank, world, dense_optimizer):
    torch.manual_seed(0)
    topo = Topology()
    strat = build_strategy("fssdp", topo)
    model = parallelize(MoETransformer(tiny_config()), strat)
    engine = Engine(model, strat, topo, dense_optimizer=dense_optimizer)
    experts = {id(p) for layer in moe_layers(model) for p in strat.expert_parameters(layer)}
    dense_numel = sum(p.numel() for p in model.parameters() if id(p) not in experts)
    model.loss(*batch(0, rank, False))[0].backward()
    engine.sync_gradients()
    dense_grads_left = sum(p.grad is not None for p in model.parameters() if id(p) not in experts)
    engine.clip()
    engine.optimizer.step()
    if engine.dense_shard is not None:
        engine.dense_shard.all_gather_parameters(stats=topo.stats)
    moments = sum(v.numel() for p, st in engine.optimizer.state.items() if id(p) not in experts
                  for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    first = next(p for p in model.parameters() if id(p) not in experts).detach().clone()
    return {"moments": moments, "dense_numel": dense_numel, "grads_left": dense_grads_left, "first": first,
            "sent": {n: topo.stats.sent(n) for n in ("dense.reduce_scatter", "dense.all_gather",
                                                        "dense.all_reduce")}}


@pytest.mark.parametrize("world", [2, 3])
def test_fssdp_shards_dense_optimizer_state_by_default(world):
    sharded = run_distributed(_dense_state_case, world, "auto")
    replicated = run_distributed(_dense_state_case, world, "replicated")
    N = sharded[0]["dense_numel"]
    shard = -(-N // world)
    for s, r in zip(sharded, replicated):
        assert s["moments"] == 2 * shard  # exp_avg + exp_avg_sq of this rank's flat shard only
        assert r["moments"] == 2 * N
        assert s["grads_left"] == 0  # only the shard's gradient is kept after the reduce-scatter
        # A reduce-scatter plus an all-gather: the bytes of a ring all-reduce.
        assert s["sent"]["dense.reduce_scatter"] == s["sent"]["dense.all_gather"] == (world - 1) * shard * 4
        assert s["sent"]["dense.all_reduce"] == 0
        # After the step every rank holds the same, updated dense weights as the replicated run.
        torch.testing.assert_close(s["first"], r["first"], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(s["first"], sharded[0]["first"]) for s in sharded)


@pytest.mark.parametrize("strategy", ["dp", "ep", "fssdp"])
def test_sharded_dense_optimizer_trains_like_single_process(strategy):
    world = 3 if strategy != "ep" else 2  # W=3: the flat buffer needs padding
    for out in run_distributed(train_case, world, strategy, {}, 5, 0, False, None,
                               {"dense_optimizer": "sharded"}):
        losses, ref = out["losses"]
        for a, b in zip(losses, ref):
            assert abs(a - b) < 1e-5 * max(1.0, abs(b))
        dense, ref_dense = out["dense"]
        for n in ref_dense:
            torch.testing.assert_close(dense[n], ref_dense[n], rtol=1e-4, atol=1e-5)


def _checkpoint_case(rank, world, path, save_mode, load_mode):
    from hecate.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    base = MoETransformer(tiny_config())
    topo = Topology()
    strat = build_strategy("fssdp", topo)
    model = parallelize(copy.deepcopy(base), strat)
    engine = Engine(model, strat, topo, dense_optimizer=save_mode)
    for step in range(2):
        model.loss(*batch(step, rank, False))[0].backward()
        engine.step()
    saved = engine.dense_optimizer_state()
    save_checkpoint(path, model, strat, engine, step=2, topology=topo)
    topo2 = Topology()
    strat2 = build_strategy("fssdp", topo2)
    model2 = parallelize(copy.deepcopy(base), strat2)
    engine2 = Engine(model2, strat2, topo2, dense_optimizer=load_mode)
    load_checkpoint(path, model2, strat2, engine2, topology=topo2)
    loaded = engine2.dense_optimizer_state()
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {n: p for n, p in model2.named_parameters()}
    ok = len(saved) == len(loaded) > 0
    for p, st in saved.items():
        q = by_name[names[id(p)]]
        ok &= torch.equal(p.detach(), q.detach())
        ok &= all(torch.equal(st[k], loaded[q][k]) for k in ("exp_avg", "exp_avg_sq"))
    return bool(ok)


@pytest.mark.parametrize("save_mode,load_mode", [("sharded", "replicated"), ("replicated", "sharded")])
def test_checkpoint_moves_dense_optimizer_state_between_layouts(tmp_path, save_mode, load_mode):
    assert run_distributed(_checkpoint_case, 2, str(tmp_path), save_mode, load_mode) == [True, True]


def test_dense_optimizer_is_checked():
    strategy = build_strategy("local")
    model = parallelize(MoETransformer(tiny_config()), strategy)
    with pytest.raises(ValueError, match=r"parallel\.dense_optimizer='zero3' must be one of"):
        Engine(model, strategy, dense_optimizer="zero3")


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _reduce_paths_case(rank, world, dtype, sizes):
    """The shard gradient reduced as on gloo (one all-to-all, then the W slices added in rank
    order), by the backend's reduce_scatter and by an all-reduce keeping the slice (the gloo
    path before), from the same gradients (magnitudes 1e-4..1e4, so the summation order would
    show in the bits)."""
    import torch.distributed as dist
    from torch import nn

    from hecate.comm.all_to_all import reduce_scatter_by_all_to_all
    from hecate.parallel.dense_shard import DenseShard

    params = [nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]

    def grads_of(r):
        g = torch.Generator().manual_seed(r)
        return [(torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 5, p.shape, generator=g)).to(dtype)
                for p in params]

    shard = DenseShard(params, rank, world)
    picks = shard.reduce_by_all_to_all
    out = {}
    for all_to_all in (True, False):
        for p, gr in zip(params, grads_of(rank)):
            p.grad = gr.clone()
        shard.reduce_by_all_to_all = all_to_all
        shard.reduce_scatter_gradients()
        out[all_to_all] = shard.shard.grad.clone()
    lo, hi = shard.shard_range
    pad = torch.zeros(shard.flat.numel() - shard.numel, dtype=dtype)
    flats = [torch.cat(grads_of(r) + [pad]) for r in range(world)]  # every rank's flat gradient, made here
    total = flats[0] + flats[1]
    for f in flats[2:]:
        total += f
    rank_order = total[lo:hi] / world
    abs_sum = sum(f.abs().float() for f in flats)[lo:hi]
    try:  # others that are not W - 1 slices of own's size: refused before any collective, on every rank
        reduce_scatter_by_all_to_all(torch.zeros(hi - lo, dtype=dtype), flats[rank])
        refused = ""
    except ValueError as e:
        refused = str(e)
    reduced = flats[rank].clone()
    dist.all_reduce(reduced)
    all_reduce = reduced[lo:hi] / world
    return {"gloo_picks_all_to_all": picks, "padded": pad.numel() > 0,
            "rank_order_bits": torch.equal(_bits(out[True]), _bits(rank_order)),
            "reduce_scatter_bits": torch.equal(_bits(out[True]), _bits(out[False])),
            "all_reduce_bits": torch.equal(_bits(out[True]), _bits(all_reduce)),
            "all_to_all": out[True], "reduce_scatter": out[False], "abs_sum": abs_sum,
            "refused": refused}


# 169 elements: padded for W = 2, 3, 4; 5 at W = 4: shards of 2, the last one padding only.
@pytest.mark.parametrize("world,dtype,sizes", [(2, torch.float32, (7, 129, 33)), (3, torch.float32, (7, 129, 33)),
                                               (3, torch.bfloat16, (7, 129, 33)), (4, torch.float32, (7, 129, 33)),
                                               (4, torch.float32, (2, 3))])
def test_gloo_all_to_all_reduce_scatter_sums_in_rank_order(world, dtype, sizes):
    """On gloo the dense gradients are reduce-scattered by one all-to-all and a local sum
    (gloo's reduce_scatter reduces the whole input, at about twice an all-reduce's time). The
    shard's gradient must be the rank-order sum / W bit for bit on its owner (so every rank
    gathers the same weights), and for W = 2 also what reduce_scatter and the all-reduce give
    (a + b has one order); for W > 2 those sum in gloo's ring order, so only close."""
    for out in run_distributed(_reduce_paths_case, world, dtype, sizes):
        assert out["gloo_picks_all_to_all"] and out["padded"] and out["rank_order_bits"]
        assert f"the W - 1 = {world - 1} other slices of own's size" in out["refused"]
        if world == 2:
            assert out["reduce_scatter_bits"] and out["all_reduce_bits"]
        else:
            # Two orders of W additions and a division each round within u = eps/2 per operation:
            # they differ by at most 2 * W * u * sum|a_r| / W = eps * sum|a_r|, element by element.
            diff = (out["all_to_all"].float() - out["reduce_scatter"].float()).abs()
            assert bool((diff <= torch.finfo(dtype).eps * out["abs_sum"]).all())


def _missing_grad_case(rank, world):
    from torch import nn

    from hecate.parallel.dense_shard import DenseShard

    params = [nn.Parameter(torch.zeros(n)) for n in (3, 4)]  # 7: one element of padding at W = 2
    shard = DenseShard(params, rank, world)
    params[1].grad = torch.full((4,), float(rank + 1))
    params[0].grad = torch.ones(3) if rank == 0 else None  # rank 1 has no gradient for params[0]
    shard.reduce_scatter_gradients()
    try:
        DenseShard([nn.Parameter(torch.zeros(3))], 1 - rank, world)
        refused = ""
    except ValueError as e:
        refused = str(e)
    return shard.shard.grad.tolist(), refused


def test_missing_dense_gradient_counts_as_zero():
    """A dense parameter without a gradient on some rank contributes zeros, as in the replicated
    all-reduce; the padding stays zero."""
    out = run_distributed(_missing_grad_case, 2)
    assert [grad for grad, _ in out] == [[0.5, 0.5, 0.5, 1.5], [1.5, 1.5, 1.5, 0.0]]
    # A rank numbered otherwise than in the group would pair one shard with another's gradient.
    assert all(f"got rank {1 - r} of 2, but this process is rank {r} of 2" in refused
               for r, (_, refused) in enumerate(out))
