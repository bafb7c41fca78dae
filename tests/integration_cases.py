"""Worker functions for tests/test_integration_*.py (run on every rank by run_distributed).

DeepSpeed is imported inside the workers only, after DS_ACCELERATOR=cpu is set, so this
module imports without it.
"""
import os

import torch
import torch.distributed as dist
from torch import nn

D, F = 16, 32


def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def gelu_expert(d=D, f=F):
    return nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))


def distinct_experts(num_experts, d=D, f=F, seed=7):
    """Different weights per expert (DeepSpeed starts them as copies, which hides mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    return {"w1_EFD": torch.randn(num_experts, f, d, generator=g) / d ** 0.5,
            "w2_EDF": torch.randn(num_experts, d, f, generator=g) / f ** 0.5}


def _ds_expert_grads(ds, full_shape_E, world):
    """DeepSpeed's expert grads placed at global ids, summed over ranks and / world (the
    data-parallel mean the DeepSpeed engine would apply)."""
    from deepspeed.utils import groups

    name = ds.expert_group_name
    ep_rank = groups._get_expert_parallel_rank(name)
    nl = ds.num_local_experts
    g1 = torch.zeros(full_shape_E["w1_EFD"])
    g2 = torch.zeros(full_shape_E["w2_EDF"])
    for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        g1[ep_rank * nl + i] = ex[0].weight.grad
        g2[ep_rank * nl + i] = ex[2].weight.grad
    for g in (g1, g2):
        dist.all_reduce(g)
        g /= world
    return {"w1_EFD": g1, "w2_EDF": g2}


def ds_equivalence(rank, world, k, ep_size, drop_tokens, use_residual, tokens, strategy,
                   capacity_factor=1.0, min_capacity=0):
    """deepspeed.moe.layer.MoE vs hecate.integrations.deepspeed.MoE on the same weights and tokens:
    returns the max abs differences of output, l_aux, exp_counts and every gradient."""
    _deepspeed()
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import groups

    from hecate.integrations.deepspeed import MoE

    E = 8
    torch.manual_seed(0)
    expert = gelu_expert()
    kw = dict(num_experts=E, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
              eval_capacity_factor=capacity_factor, min_capacity=min_capacity, use_residual=use_residual,
              drop_tokens=drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
    ds = DSMoE(D, expert, **kw)
    ds.set_deepspeed_parallelism()
    hm = MoE(D, expert, **kw, strategy=strategy)
    full = distinct_experts(E)
    ep_rank = groups._get_expert_parallel_rank(ds.expert_group_name)
    nl = ds.num_local_experts
    with torch.no_grad():
        for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            ex[0].weight.copy_(full["w1_EFD"][ep_rank * nl + i])
            ex[2].weight.copy_(full["w2_EDF"][ep_rank * nl + i])
        hm.moe.router.weight_ED.copy_(ds.deepspeed_moe.gate.wg.weight)
        if use_residual:
            hm.moe.residual.coefficient.load_state_dict(ds.coefficient.state_dict())
    hm.strategy.load_experts(hm.moe, full)
    n = tokens[rank]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, n // 2, D, generator=g)
    dy = torch.randn(2, n // 2, D, generator=g)
    res = {}
    outs = []
    for side, layer in (("ds", ds), ("hecate", hm)):
        xi = x.clone().requires_grad_(True)
        y, l_aux, counts = layer(xi)
        ((y * dy).sum() + 0.5 * l_aux).backward()
        outs.append((y.detach(), l_aux.detach(), counts.detach().long(), xi.grad))
        if side == "hecate":  # how many entries the capacity dropped on this rank (tests want > 0)
            with torch.no_grad():
                stats = hm.moe(x.reshape(-1, D)).stats
            res["dropped"] = int(stats.tokens_per_expert_E.sum() - stats.kept_per_expert_E.sum())
    (y0, a0, c0, gx0), (y1, a1, c1, gx1) = outs
    res["y"] = float((y0 - y1).abs().max())
    res["l_aux"] = abs(float(a0) - float(a1))
    res["counts_equal"] = bool(torch.equal(c0, c1))
    res["dx"] = float((gx0 - gx1).abs().max())
    res["dgate"] = float((ds.deepspeed_moe.gate.wg.weight.grad - hm.moe.router.weight_ED.grad).abs().max())
    from hecate.integrations.deepspeed import finish_backward

    finish_backward(hm)
    hg = hm.strategy.gather_experts(hm.moe, grads=True)
    dg = _ds_expert_grads(ds, {n_: v.shape for n_, v in full.items()}, world)
    res["dexperts"] = max(float((hg[n_] - dg[n_]).abs().max()) for n_ in dg)
    if use_residual:
        res["dresidual"] = float((ds.coefficient.weight.grad - hm.moe.residual.coefficient.weight.grad).abs().max())
    res["scale"] = float(y0.abs().max())
    return res
