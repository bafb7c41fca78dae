"""Worker functions shared by the training-equivalence tests (run on every rank)."""
import copy

import torch
import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.parallel.local import LocalStrategy
from hecate.train.engine import Engine

VOCAB, D, SEQ, BATCH = 61, 32, 12, 2


def tiny_config(num_experts=8, k=2, capacity_factor=None):
    moe = MoEConfig(hidden_size=D, ffn_hidden_size=48, num_experts=num_experts, top_k=k,
                    capacity_factor=capacity_factor, min_capacity=1, aux_loss_coeff=0.01)
    return TransformerConfig(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=4, max_seq_len=SEQ,
                             dense_ffn_hidden=48, moe_every=1, moe=moe)


def batch(step, rank, skew):
    g = torch.Generator().manual_seed(1000 * step + rank)
    if skew:  # a few token ids dominate, so routing is skewed and re-sharding has load to see
        tokens = torch.randint(0, 4, (BATCH, SEQ + 1), generator=g)
    else:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_side_by_side(rank, world, base, strategy, options, steps, loss_of, **engine_kwargs):
    """Train a copy of `base` under `strategy` on this rank, and a local reference on every
    rank's batch (loss / W each, i.e. gradient accumulation over the ranks), step by step.

    loss_of(model, step, r) is rank r's loss at `step`. Returns the strategy and a dict of
    losses (distributed mean, reference) per step and the final dense and expert parameters.
    """
    ref = copy.deepcopy(base)
    ref_engine = Engine(ref, LocalStrategy(), **engine_kwargs)
    topo = Topology()
    strat = build_strategy(strategy, topo, **options)
    model = parallelize(copy.deepcopy(base), strat)
    engine = Engine(model, strat, topo, **engine_kwargs)
    ref_losses, losses = [], []
    for step in range(steps):
        total = 0.0
        for r in range(world):
            loss = loss_of(ref, step, r)
            (loss / world).backward()
            total += float(loss.detach()) / world
        ref_engine.step()
        ref_losses.append(total)

        loss = loss_of(model, step, rank)
        loss.backward()
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)

    dense = {n: p.detach() for n, p in model.named_parameters() if not is_expert_parameter(p)}
    ref_dense = {n: p.detach() for n, p in ref.named_parameters() if n in dense}
    experts = [strat.gather_experts(layer) for layer in moe_layers(model)]
    ref_experts = [{n: p.detach() for n, p in layer.experts.named_parameters()} for layer in moe_layers(ref)]
    return strat, {"losses": (losses, ref_losses), "dense": (dense, ref_dense),
                   "experts": (experts, ref_experts), "num_moe_layers": len(moe_layers(model))}


def train_case(rank, world, strategy, options, steps, seed=0, skew=False, capacity_factor=None,
               engine_kwargs=None):
    torch.manual_seed(seed)
    base = MoETransformer(tiny_config(capacity_factor=capacity_factor))
    strat, out = train_side_by_side(rank, world, base, strategy, options, steps,
                                    lambda m, step, r: m.loss(*batch(step, r, skew))[0],
                                    lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6,
                                    **(engine_kwargs or {}))
    out["reshards"] = getattr(strat, "reshards", 0)
    out["timings"] = dict(getattr(strat, "timings", {}))
    return out


def check_training(results, rtol=2e-4, atol=1e-4):
    """Losses match tightly; parameters within 1e-4 (Adam turns summation-order noise in
    near-zero gradients into lr-sized steps on a few elements; a real bug moves many)."""
    r = results[0]
    losses, ref_losses = r["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for res in results:
        dense, ref_dense = res["dense"]
        assert set(dense) == set(ref_dense) and dense
        for n in dense:
            torch.testing.assert_close(dense[n], ref_dense[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
        for got, want in zip(*res["experts"]):
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
