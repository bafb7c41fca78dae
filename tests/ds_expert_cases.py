"""Expert modules of every form and the worker that compares the drop-in MoE built from them
with DeepSpeed's own MoE (run on every rank by run_distributed; DeepSpeed imported inside)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.integration_cases import ISOLATED, D, _deepspeed  # noqa: F401 - ISOLATED re-exported

H = 24


class SwiGLU(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.gate, self.up = nn.Linear(D, H, bias=bias), nn.Linear(D, H, bias=bias)
        self.down = nn.Linear(H, D, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeGLU(nn.Module):
    """One fused projection split with chunk (the form many codebases use)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 2 * H)
        self.out = nn.Linear(H, D)

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return self.out(F.gelu(a, approximate="tanh") * b)


class NormedMLP(nn.Module):
    """A LayerNorm inside the expert: not a Linear/elementwise graph (generic path)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(D, H), nn.LayerNorm(H), nn.Linear(H, D, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def make_expert(form: str) -> nn.Module:
    if form == "linear_bias_gelu":
        return nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
    if form == "tanh_gelu_mixed_bias":
        return nn.Sequential(nn.Linear(D, H, bias=True), nn.GELU(approximate="tanh"), nn.Linear(H, D, bias=False))
    if form == "relu":
        return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
    if form == "silu_dropout":
        return nn.Sequential(nn.Linear(D, H, bias=False), nn.SiLU(), nn.Dropout(0.25), nn.Linear(H, D, bias=False))
    if form == "swiglu":
        return SwiGLU()
    if form == "swiglu_bias":
        return SwiGLU(bias=True)
    if form == "geglu":
        return GeGLU()
    if form == "generic_norm":
        return NormedMLP()
    raise ValueError(form)


FORMS = ["linear_bias_gelu", "tanh_gelu_mixed_bias", "relu", "silu_dropout", "swiglu", "swiglu_bias", "geglu",
         "generic_norm"]


def distinct_weights(expert: nn.Module, num_experts: int, seed=11) -> dict:
    """Different random values per expert for every parameter, stacked [E, ...] under
    ModuleExperts' names."""
    g = torch.Generator().manual_seed(seed)
    return {n.replace(".", "__"): torch.randn(num_experts, *p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5
            for n, p in expert.named_parameters()}


def _paired_layers(form, kw, strategy, use_residual, train):
    """DeepSpeed's MoE and the drop-in, both built from make_expert(form) with the MoE kwargs kw,
    loaded with the same distinct expert weights, gate and residual. Returns (ds, hm, full,
    first): full holds every expert's weights, first is this rank's first expert in DeepSpeed."""
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import groups

    from hecate.integrations.deepspeed import MoE

    torch.manual_seed(0)
    expert = make_expert(form)
    ds = DSMoE(D, expert, **kw)
    ds.set_deepspeed_parallelism()
    hm = MoE(D, expert, **kw, strategy=strategy)
    full = distinct_weights(expert, kw["num_experts"])
    first = groups._get_expert_parallel_rank(ds.expert_group_name) * ds.num_local_experts
    with torch.no_grad():
        for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            for n, p in ex.named_parameters():
                p.copy_(full[n.replace(".", "__")][first + i])
        hm.moe.router.weight_ED.copy_(ds.deepspeed_moe.gate.wg.weight)
        if use_residual:
            hm.moe.residual.coefficient.load_state_dict(ds.coefficient.state_dict())
            hm.moe.residual.mlp.load_state_dict(ds.mlp.state_dict())
    hm.strategy.load_experts(hm.moe, full)
    if not train:
        ds.eval()
        hm.eval()
    return ds, hm, full, first


def _rank_inputs(rank, tokens):
    """This rank's input x and output gradient dy ([tokens[rank], D] each)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens[rank], D, generator=g)
    dy = torch.randn(tokens[rank], D, generator=g)
    return x, dy


def _forward_backward_gaps(ds, hm, x, dy, gate_seed=None):
    """Forward and backward of both layers on x (reseeding the global generator with gate_seed
    before each forward when given); max abs differences of output, l_aux, dx and gate gradient."""
    outs = []
    for layer in (ds, hm):
        xi = x.clone().requires_grad_(True)
        if gate_seed is not None:
            torch.manual_seed(gate_seed)  # the same generator state for both gates' draws
        y, l_aux, counts = layer(xi)
        ((y * dy).sum() + 0.5 * l_aux).backward()
        outs.append((y.detach(), l_aux.detach(), counts.detach().long(), xi.grad))
    (y0, a0, c0, gx0), (y1, a1, c1, gx1) = outs
    return {"y": float((y0 - y1).abs().max()), "l_aux": abs(float(a0) - float(a1)),
            "counts_equal": bool(torch.equal(c0, c1)), "dx": float((gx0 - gx1).abs().max()),
            "dgate": float((ds.deepspeed_moe.gate.wg.weight.grad - hm.moe.router.weight_ED.grad).abs().max()),
            "scale": float(y0.abs().max())}


def _expert_grad_gap(ds, hm, full, first, world):
    """Finish the drop-in's backward; the max abs difference of every expert gradient."""
    from hecate.integrations.deepspeed import finish_backward

    finish_backward(hm)
    hg = hm.strategy.gather_experts(hm.moe, grads=True)
    worst = 0.0
    for name, v in full.items():
        dg = torch.zeros_like(v)
        for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            dg[first + i] = dict(ex.named_parameters())[name.replace("__", ".")].grad
        dist.all_reduce(dg)
        dg /= world  # the data-parallel mean DeepSpeed's engine applies
        worst = max(worst, float((hg[name] - dg).abs().max()))
    return worst


def ds_form_equivalence(rank, world, form, k, ep_size, drop_tokens, use_residual, tokens, strategy, train=True):
    """DeepSpeed MoE vs the drop-in MoE, both built from make_expert(form), on the same weights:
    max abs differences of the output, l_aux, dx, the gate gradient and every expert gradient."""
    _deepspeed()
    kw = dict(num_experts=8, ep_size=ep_size, k=k, capacity_factor=1.0, min_capacity=0, use_residual=use_residual,
              drop_tokens=drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
    ds, hm, full, first = _paired_layers(form, kw, strategy, use_residual, train)
    x, dy = _rank_inputs(rank, tokens)
    res = _forward_backward_gaps(ds, hm, x, dy)
    res["mode"] = hm.moe.experts.mode
    res["dexperts"] = _expert_grad_gap(ds, hm, full, first, world)
    if use_residual:
        res["dresidual"] = max(float((a.grad - b.grad).abs().max()) for a, b in
                               zip(ds.mlp.parameters(), hm.moe.residual.mlp.parameters()))
    return res


def ds_sampling_equivalence(rank, world, k, gate_kw, drop_tokens, use_residual, tokens, strategy, train=True,
                            form="linear_bias_gelu"):
    """DeepSpeed MoE vs the drop-in with DeepSpeed's random gate options (gate_kw: use_rts,
    top2_2nd_expert_sampling, noisy_gate_policy), both run from the same generator state:
    the draws, hence every output and gradient, must be the same."""
    _deepspeed()
    kw = dict(num_experts=8, ep_size=2 if world >= 2 else 1, k=k, capacity_factor=1.0, min_capacity=0,
              use_residual=use_residual, drop_tokens=drop_tokens, **gate_kw)
    ds, hm, full, first = _paired_layers(form, kw, strategy, use_residual, train)
    x, dy = _rank_inputs(rank, tokens)
    res = _forward_backward_gaps(ds, hm, x, dy, gate_seed=1234 + rank)
    with torch.no_grad():  # how many entries the capacity dropped on this rank (the test wants > 0)
        torch.manual_seed(1234 + rank)
        stats = hm.moe(x).stats
        res["dropped"] = int(stats.tokens_per_expert_E.sum() - stats.kept_per_expert_E.sum())
    res["dexperts"] = _expert_grad_gap(ds, hm, full, first, world)
    return res


class ExpertFormModel(nn.Module):
    """dense -> drop-in MoE built from make_expert(form) -> dense head (a model written against
    DeepSpeed's MoE API); forward(x, y) -> loss."""

    def __init__(self, form, strategy, num_experts=4):
        super().__init__()
        from hecate.integrations.deepspeed import MoE

        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, make_expert(form), num_experts=num_experts, k=2, drop_tokens=False,
                       top2_2nd_expert_sampling=False, strategy=strategy)
        self.head = nn.Linear(D, D)

    def forward(self, x, y):
        out, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return ((self.head(out) - y) ** 2).mean() + 0.01 * l_aux


def module_experts_training(rank, world, form, strategy, steps=3):
    """The same model trained with Hecate's Engine under `strategy` and under dp (replicated
    experts, the single-process reference at this world size): loss curves and weight difference."""
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy
    from hecate.train.engine import Engine

    runs = {}
    for name in ("dp", strategy):
        torch.manual_seed(0)
        strat = build_strategy(name, Topology())
        model = ExpertFormModel(form, strat)
        strat.load_experts(model.moe.moe, distinct_weights(make_expert(form), 4))
        engine = Engine(model, strat, Topology(), lr=3e-3, weight_decay=0.01, max_grad_norm=None)
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(2, 5 + rank, D, generator=g), torch.randn(2, 5 + rank, D, generator=g)
            loss = model(x, y)
            loss.backward()
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        runs[name] = (losses, strat.gather_experts(model.moe.moe),
                      {n: p.detach().clone() for n, p in model.named_parameters() if "experts" not in n})
    (l0, e0, d0), (l1, e1, d1) = runs["dp"], runs[strategy]
    diff = max(float((e0[n] - e1[n]).abs().max()) for n in e0)
    diff = max([diff] + [float((d0[n] - d1[n]).abs().max()) for n in d0 if n in d1])
    moved = max(float((e0[n] - distinct_weights(make_expert(form), 4)[n]).abs().max()) for n in e0)
    return {"losses": (l0, l1), "diff": diff, "moved": moved}
