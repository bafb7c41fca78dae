"""Worker functions for the model-zoo tests: a tiny preset trained under a strategy on every
rank, next to the same model trained in one process on all ranks' batches."""
import copy

import torch
import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.models.registry import build_model, get_preset
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.parallel.local import LocalStrategy
from hecate.train.engine import Engine

SEQ, BATCH = 12, 2
OPTIONS = {"dp": {}, "ep": {}, "fsdp": {}, "fssdp": {"overlap_degree": 2, "fit_replicas": False}}


def batch(step, rank, vocab):
    """Two fixed batches per rank, alternating, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(100 * (step % 2) + rank)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_case(rank, world, preset, strategy, steps, seed=0):
    p = get_preset(preset)
    torch.manual_seed(seed)
    base = build_model(p.arch, p.config)
    vocab = base.cfg.vocab_size
    ref = copy.deepcopy(base)
    opt = dict(lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    ref_engine = Engine(ref, LocalStrategy(), **opt)
    topo = Topology()
    strat = build_strategy(strategy, topo, **OPTIONS[strategy])
    model = parallelize(copy.deepcopy(base), strat)
    engine = Engine(model, strat, topo, **opt)
    losses, ref_losses = [], []
    for step in range(steps):
        total = 0.0
        for r in range(world):
            x, y = batch(step, r, vocab)
            loss, _ = ref.loss(x, y)
            (loss / world).backward()
            total += float(loss.detach()) / world
        ref_engine.step()
        ref_losses.append(total)
        x, y = batch(step, rank, vocab)
        loss, _ = model.loss(x, y)
        loss.backward()
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    dense = {n: p.detach() for n, p in model.named_parameters() if not is_expert_parameter(p)}
    ref_dense = {n: p.detach() for n, p in ref.named_parameters() if n in dense}
    experts = [strat.gather_experts(layer) for layer in moe_layers(model)]
    ref_experts = [{n: p.detach() for n, p in layer.experts.named_parameters()} for layer in moe_layers(ref)]
    return {"losses": losses, "ref_losses": ref_losses, "dense": (dense, ref_dense),
            "experts": (experts, ref_experts)}
