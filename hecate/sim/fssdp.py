"""A small cluster-scale simulator of FSSDP planning under the analytic cost model.

It replays synthetic routing (Zipf-skewed expert popularity that drifts from
step to step, so recent history predicts the next step only approximately)
through the real planners and sums the cost model's estimated MoE-layer time
per step. No tensors move and no device runs: this ranks policies at cluster
sizes we cannot run (16 to 1024 ranks), it does not predict wall time.

Policies compared: `ep` (even sharding, no replication), `shadowing`
(FasterMoE-style on even sharding), `hecate` (Algorithm 1 on predicted load,
Algorithm 2 re-sharding every `reshard_every` steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hecate.parallel.fssdp import (
    CostModel,
    HecatePolicy,
    LoadPredictor,
    NoReplicationPolicy,
    ShadowingPolicy,
    build_plan,
    even_sharding,
    heterogeneous_sharding,
    node_of_ranks,
)
from hecate.parallel.fssdp._checks import check_positive_int


@dataclass(frozen=True)
class Workload:
    """Synthetic routing: `tokens_per_rank` token-expert assignments per rank and layer."""

    num_layers: int = 2
    num_experts: int = 64
    tokens_per_rank: int = 8192
    zipf_skew: float = 1.2
    drift: float = 0.05  # std of the log-popularity random walk per step
    seed: int = 0


def _counts_stream(workload: Workload, world_size: int, steps: int):
    """Yield [L] lists of counts_WE per step (deterministic given the seed)."""
    rng = np.random.default_rng(workload.seed)
    L, E = workload.num_layers, workload.num_experts
    base = np.log(1.0 / np.arange(1, E + 1) ** workload.zipf_skew)
    logits = np.stack([rng.permutation(base) for _ in range(L)])
    for _ in range(steps):
        logits = logits + rng.normal(0.0, workload.drift, size=logits.shape)
        layers = []
        for l in range(L):
            p = np.exp(logits[l] - logits[l].max())
            p /= p.sum()
            counts = rng.multinomial(workload.tokens_per_rank, p, size=world_size)
            layers.append(torch.from_numpy(counts.astype(np.int64)))
        yield layers


def simulate(cost_model: CostModel, workload: Workload, *, num_ranks: int, ranks_per_node: int,
             capacity_m: int, steps: int = 20, reshard_every: int = 10,
             policies: tuple[str, ...] = ("ep", "shadowing", "hecate")) -> dict:
    """Mean estimated MoE time per step (seconds, summed over layers) for each policy.

    Returns {"seconds_per_step": {policy: s}, "speedup_vs_ep": {policy: x}, ...}.
    """
    W = check_positive_int(num_ranks, "num_ranks")
    rpn = check_positive_int(ranks_per_node, "ranks_per_node")
    steps = check_positive_int(steps, "steps")
    reshard_every = check_positive_int(reshard_every, "reshard_every")
    unknown = set(policies) - {"ep", "shadowing", "hecate"}
    if unknown:
        raise ValueError(f"policies has unknown names {sorted(unknown)}; use ep, shadowing, hecate")
    L, E = workload.num_layers, workload.num_experts
    nodes = node_of_ranks(W, rpn)
    nodes_np = nodes.numpy()
    even = even_sharding(E, W)
    owners = {name: even.repeat(L, 1) for name in policies}
    makers = {"ep": NoReplicationPolicy(), "shadowing": ShadowingPolicy(cost_model),
              "hecate": HecatePolicy(cost_model)}
    predictors = [LoadPredictor(E) for _ in range(L)]
    t = cost_model.overlap_degree(multi_node=W > rpn)
    totals = {name: 0.0 for name in policies}
    for step, counts_L in enumerate(_counts_stream(workload, W, steps)):
        for name in policies:
            for l in range(L):
                plan = build_plan(makers[name], predictors[l].predict(), owners[name][l],
                                  counts_L[l], nodes, capacity_m)
                hidden = 0.0 if name == "shadowing" else None
                totals[name] += cost_model.plan_time(plan.holders_WE, plan.owner_E,
                                                     plan.routes_WEW, nodes_np, hidden_s=hidden)
        for l in range(L):
            predictors[l].update_from_rank_counts(counts_L[l])
        if "hecate" in policies and (step + 1) % reshard_every == 0:
            loads = torch.stack([p.predict() for p in predictors])
            t_layers = t if t <= capacity_m else 0
            owners["hecate"] = heterogeneous_sharding(loads, W, rpn, t_layers)
    per_step = {name: totals[name] / steps for name in policies}
    result = {"num_ranks": W, "ranks_per_node": rpn, "num_experts": E, "overlap_degree": t,
              "capacity_m": capacity_m, "steps": steps, "seconds_per_step": per_step}
    if "ep" in per_step:
        result["speedup_vs_ep"] = {name: per_step["ep"] / per_step[name] for name in policies}
    return result
