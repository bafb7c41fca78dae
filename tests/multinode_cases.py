"""Worker functions of the multi-node tests: several fake nodes of 2 ranks on one host (gloo).

The node layout comes from LOCAL_WORLD_SIZE, as under torchrun (one torchrun per node sets
it to the ranks of its node); the pool's workers set it for the task and restore it after.
"""
import contextlib
import os

import torch

from hecate.models.transformer import MoETransformer
from tests.training_cases import tiny_config, train_side_by_side

VOCAB = 61
BATCH, SEQ = 16, 12  # 192 tokens x top-2 per rank (SEQ = the tiny model's max_seq_len): a hot replica pays


@contextlib.contextmanager
def ranks_per_node(n: int):
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def skewed_batch(step, rank):
    """Two token ids make almost all of the input, so a few experts take most entries."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 2, (BATCH, SEQ + 1), generator=g)
    noise = torch.rand(BATCH, SEQ + 1, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g), tokens)
    return tokens[:, :-1], tokens[:, 1:]


def train_on_nodes(rank, world, strategy, options, steps, rpn):
    """Train under `strategy` with nodes of `rpn` ranks next to a single-process reference;
    also return this rank's CommStats with the intra/inter-node split."""
    with ranks_per_node(rpn):
        torch.manual_seed(0)
        base = MoETransformer(tiny_config(num_experts=24))  # divisible by W = 6 and 8 (ep)
        strat, out = train_side_by_side(rank, world, base, strategy, options, steps,
                                        lambda m, step, r: m.loss(*skewed_batch(step, r))[0],
                                        lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    topo = strat.topology
    out["num_nodes"] = topo.num_nodes
    out["links"] = topo.stats.snapshot(links=True)
    return out


def train_and_trace(rank, world, strategy, options, steps, rpn, trace_path):
    """Train under `strategy` (nodes of `rpn` ranks) while recording the routing trace the way
    `hecate train --set logging.trace=FILE` does; return this rank's CommStats (with links,
    without the trace's own gather) and the number of dense parameters."""
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy, moe_layers, parallelize
    from hecate.parallel.chunks import is_expert_parameter
    from hecate.train.engine import Engine
    from hecate.train.routing_trace import RoutingTraceWriter

    with ranks_per_node(rpn):
        topo = Topology()
    torch.manual_seed(0)
    strat = build_strategy(strategy, topo, **options)
    base = MoETransformer(tiny_config(num_experts=8))
    chunk = sum(p.numel() for p in base.moe_layers()[0].experts.parameters()) // 8
    model = parallelize(base, strat)
    engine = Engine(model, strat, topo, lr=3e-3)
    layers = moe_layers(model)
    writer = RoutingTraceWriter(trace_path, topo, [layer.config.num_experts for layer in layers],
                                d_model=layers[0].config.hidden_size)
    for step in range(steps):
        loss, out = model.loss(*skewed_batch(step, rank))
        loss.backward()
        engine.step()
        writer.record(step, [s.tokens_per_expert_E for s in out.moe_stats])
    writer.close()
    snap = topo.stats.snapshot(links=True)
    snap.pop("trace.counts", None)
    dense = sum(p.numel() for p in model.parameters() if not is_expert_parameter(p))
    return snap, dense, chunk

