"""Switch-DiT's paper experts: linear D -> D maps (stacked [E, D, D] ModuleExperts) and the shared
expert every timestep uses; both start at zero so the switch is the identity at init."""
import pytest
import torch

from hecate.data import shapes_batch
from hecate.models.diffusion import sample_t_and_noise
from hecate.models.registry import build_model, get_preset
from hecate.testing import run_distributed
from tests.training_cases import check_training


def test_linear_and_shared_experts():
    torch.manual_seed(0)
    p = get_preset("tiny-switch-dit")
    model = build_model(p.arch, dict(p.config, expert_type="linear", shared_expert=True))
    block = model.blocks[0]
    w = model.expert_output_weight(block)
    assert tuple(w.shape) == (3, 32, 32) and w.abs().sum() == 0 and block.shared.weight.abs().sum() == 0
    assert tuple(block.moe.experts.bias.shape) == (3, 32) and block.moe.experts.bias.abs().sum() == 0
    x, y = shapes_batch(0, 4)
    t, noise = sample_t_and_noise(x, 1000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.final.weight.normal_(std=0.1)
        # The switch reaches a block's output through its attention / MLP branches only (the skip
        # carries x, as in the authors' block); adaLN-Zero holds those gates shut at init.
        for b in model.blocks:
            b.ada_ln[-1].weight.normal_(std=0.1)
    h = torch.randn(2, 16, 32)
    temb = model.t_embed(torch.tensor([5, 700]))
    out, _, _ = block(h, temb, temb)
    with torch.no_grad():  # a non-zero expert changes the block's output only through the switch
        w.normal_(std=0.3)
        block.shared.weight.normal_(std=0.3)
    out2, _, _ = block(h, temb, temb)
    assert not torch.allclose(out, out2)
    with torch.no_grad():
        w.zero_()
        block.shared.weight.zero_()
    model.loss(x, y, t, noise)[0].backward()
    assert w.grad.abs().sum() > 0 and block.shared.weight.grad.abs().sum() > 0
    # Paper presets use linear experts with the shared expert.
    big = get_preset("switch-dit-s2").config
    assert big.get("expert_type", "linear") == "linear" and big.get("shared_expert", True)


# ---- a rank whose experts get no rows (ep) ------------------------------------------------------
def test_linear_experts_with_no_rows_still_reach_their_input():
    # ModuleExperts(nn.Linear) (grouped or generic path); with no rows its (empty) output must stay
    # in x's graph, or autograd never runs what produced x (under ep: the dispatch's backward).
    from torch import nn

    from hecate.moe.module_experts import ModuleExperts

    experts = ModuleExperts(nn.Linear(8, 8, bias=False), 2, warn=False)
    src = torch.randn(0, 8, requires_grad=True)
    x = src * 2.0
    y = experts(x, torch.tensor([0, 0]))
    assert y.shape == (0, 8)
    grad_x, grad_w = torch.autograd.grad(y.sum(), [src, experts.weight])
    assert grad_x.shape == (0, 8) and torch.equal(grad_w, torch.zeros(2, 8, 8))


def empty_rank_case(rank, world, num_experts, steps):
    """tiny-switch-dit with linear experts whose router always picks experts 0 and 1, so under ep
    the last rank's experts get no rows; trained side by side with one process."""
    import copy

    from tests.training_cases import train_side_by_side
    from tests.vision_cases import dit_loss

    p = get_preset("tiny-switch-dit")
    torch.manual_seed(0)
    base = build_model(p.arch, dict(p.config, expert_type="linear", num_experts=num_experts,
                                    moe={"router_bias": True}))
    with torch.no_grad():  # a logit margin the timestep embedding (|logit| << 1 at init) cannot cross
        for block in base.blocks:
            block.moe.router.bias_E.copy_(torch.tensor([4.0, 4.0] + [-4.0] * (num_experts - 2)))
    probe, seen = copy.deepcopy(base), []
    def recording(route):
        def wrapped(*a, **kw):
            routing = route(*a, **kw)
            seen.append(routing.indices_TK)
            return routing
        return wrapped
    for layer in probe.moe_layers():
        layer.route = recording(layer.route)
    dit_loss(probe, rank)
    last_rank_experts = set(range(num_experts - num_experts // world, num_experts))
    assert seen and not last_rank_experts & set(torch.cat(seen).flatten().tolist())
    _, out = train_side_by_side(rank, world, base, "ep", {}, steps, lambda m, step, r: dit_loss(m, r),
                                lr=1e-2, max_grad_norm=None, eps=1e-4)
    return out


@pytest.mark.parametrize("world,num_experts", [(2, 4), (3, 3)])
def test_ep_rank_whose_experts_get_no_rows_matches_one_process(world, num_experts):
    # Before the fix the empty rank skipped the dispatch's backward all-to-all and met its peers'
    # in the previous layer's combine backward: a gloo size mismatch.
    check_training(run_distributed(empty_rank_case, world, num_experts, 2))


def cut_expert_graph_case(rank, world):
    """Backward under ep when rank 0's expert output does not reach its received rows (an expert
    with a data-dependent shortcut): every rank must still run each dispatch's backward."""
    import hecate.parallel.ep as ep_module
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy, parallelize

    compute = ep_module.experts_on_received

    def cut_on_rank_0(layer, x_recv, counts, weights):
        y = compute(layer, x_recv, counts, weights)
        return y.detach() + 0.0 * sum(w.sum() for w in weights.values()) if rank == 0 else y

    p = get_preset("tiny-switch-dit")
    torch.manual_seed(0)
    model = parallelize(build_model(p.arch, dict(p.config, num_experts=world)), build_strategy("ep", Topology()))
    x, y = shapes_batch(rank, 2)
    t, noise = sample_t_and_noise(x, 1000, torch.Generator().manual_seed(rank))
    ep_module.experts_on_received = cut_on_rank_0
    try:
        model.loss(x, y, t, noise)[0].backward()
    finally:
        ep_module.experts_on_received = compute
    return [p.grad is not None for p in model.blocks[0].parameters() if p.requires_grad].count(True)


@pytest.mark.parametrize("world", [2, 3])
def test_ep_runs_every_dispatch_backward_when_an_expert_skips_its_input(world):
    counts = run_distributed(cut_expert_graph_case, world)
    assert counts[0] > 0 and len(set(counts)) == 1
