"""Worker functions for the Switch-DiT and Mixture-of-Mamba strategy tests (run on every rank).

Each rank trains on its own fixed batch (a function of its rank only), so the loss must fall
within a few steps; a single-process reference trains on all ranks' batches (loss / W each)
and the distributed run must match it step by step and in every parameter.
"""
import copy

import torch
import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.data import interleaved_batch, shapes_batch
from hecate.models.diffusion import sample_t_and_noise
from hecate.models.registry import build_model, get_preset
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.parallel.local import LocalStrategy
from hecate.train.engine import Engine

BATCH = 2
# No clipping: Engine.grad_norm counts unmarked expert params twice under LocalStrategy (the
# reference), so clipped runs would differ from the reference by the clip scale (reported).


def dit_loss(model, rank):
    x0, y = shapes_batch(7, BATCH, start=BATCH * rank)
    t, noise = sample_t_and_noise(x0, model.cfg.num_timesteps, torch.Generator().manual_seed(100 + rank))
    return model.loss(x0, y, t_B=t, noise_BCHW=noise)[0]


def mamba_loss(model, rank):
    tokens, modality = interleaved_batch(7, BATCH, 13, start=BATCH * rank)
    return model.loss(tokens[:, :-1], tokens[:, 1:], modality[:, :-1])[0]


CASES = {"tiny-switch-dit": dit_loss, "tiny-mixture-of-mamba": mamba_loss}


def train_preset_case(rank, world, preset, strategy, options, steps, lr=1e-2, seed=0):
    """Train `preset` under `strategy` and a local reference; return losses and parameters."""
    loss_fn = CASES[preset]
    p = get_preset(preset)
    torch.manual_seed(seed)
    base = build_model(p.arch, dict(p.config))
    ref = copy.deepcopy(base)
    ref_engine = Engine(ref, LocalStrategy(), lr=lr, max_grad_norm=None, eps=1e-4)
    topo = Topology()
    strat = build_strategy(strategy, topo, **options)
    model = parallelize(copy.deepcopy(base), strat)
    engine = Engine(model, strat, topo, lr=lr, max_grad_norm=None, eps=1e-4)
    ref_losses, losses = [], []
    for _ in range(steps):
        total = 0.0
        for r in range(world):
            loss = loss_fn(ref, r)
            (loss / world).backward()
            total += float(loss) / world
        ref_engine.step()
        ref_losses.append(total)

        loss = loss_fn(model, rank)
        loss.backward()
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)

    dense = {n: p.detach() for n, p in model.named_parameters() if not is_expert_parameter(p)}
    ref_dense = {n: p.detach() for n, p in ref.named_parameters() if n in dense}
    experts = [strat.gather_experts(layer) for layer in moe_layers(model)]
    ref_experts = [{n: p.detach() for n, p in layer.experts.named_parameters()} for layer in moe_layers(ref)]
    return {"losses": (losses, ref_losses), "dense": (dense, ref_dense), "experts": (experts, ref_experts),
            "num_moe_layers": len(moe_layers(model))}
