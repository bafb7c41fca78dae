"""How long the FSSDP planners take at paper scale: 12 MoE layers x 64 experts x 32 ranks.

Prints milliseconds per call (median of --repeat runs); --json prints one JSON
object instead. No thresholds: the numbers are for reading, not asserting.

    .venv/bin/python benchmarks/planner.py [--layers 12 --experts 64 --ranks 32 --ranks-per-node 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from hecate.parallel.fssdp import (
    CostModel,
    HecatePolicy,
    LoadPredictor,
    NoReplicationPolicy,
    ShadowingPolicy,
    build_plan,
    heterogeneous_sharding,
    node_of_ranks,
)


def zipf_counts(rng, W, E, tokens_per_rank, skew=1.2):
    p = 1.0 / np.arange(1, E + 1) ** skew
    p = rng.permutation(p / p.sum())
    return torch.from_numpy(np.stack([rng.multinomial(tokens_per_rank, p) for _ in range(W)]))


def median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=4, help="memory capacity m (chunks per rank)")
    ap.add_argument("--tokens-per-rank", type=int, default=8192, help="tokens x top-k per rank")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    L, E, W, m = args.layers, args.experts, args.ranks, args.capacity
    rng = np.random.default_rng(0)
    nodes = node_of_ranks(W, args.ranks_per_node)
    counts_L = [zipf_counts(rng, W, E, args.tokens_per_rank) for _ in range(L)]
    loads_LE = torch.stack([c.sum(0) for c in counts_L]).double()
    owner_LE = heterogeneous_sharding(loads_LE, W, args.ranks_per_node, m)
    cm = CostModel(intra_node_bw=150e9, inter_node_bw=12.5e9, chunk_bytes=2 * 768 * 1536 * 2,
                   t_non_moe=2e-3, token_compute_s=2e-8, token_bytes=768 * 2)
    predictors = [LoadPredictor(E) for _ in range(L)]

    def all_layers(policy):
        def run():
            for l in range(L):
                predictors[l].update_from_rank_counts(counts_L[l])
                build_plan(policy, predictors[l].predict(), owner_LE[l], counts_L[l], nodes, m)
        return run

    cases = {
        "hecate_top_t (t <= m)": HecatePolicy(overlap_degree=m),
        "hecate_proportional (t > m)": HecatePolicy(overlap_degree=4 * m),
        "hecate_calibrated": HecatePolicy(cm, calibrate=True),
        "shadowing": ShadowingPolicy(cm),
        "no_replication": NoReplicationPolicy(),
    }
    result = {"layers": L, "experts": E, "ranks": W, "ranks_per_node": args.ranks_per_node,
              "capacity_m": m, "overlap_degree_model": cm.overlap_degree(True),
              "ms_per_step_all_layers": {}}
    for name, policy in cases.items():
        result["ms_per_step_all_layers"][name] = round(median_ms(all_layers(policy), args.repeat), 3)
    result["ms_heterogeneous_sharding_all_layers"] = round(median_ms(
        lambda: heterogeneous_sharding(loads_LE, W, args.ranks_per_node, m), args.repeat), 3)
    if args.json:
        print(json.dumps(result))
        return
    print(f"planning {L} layers x {E} experts x {W} ranks ({W // args.ranks_per_node} nodes), m={m}")
    for name, ms in result["ms_per_step_all_layers"].items():
        print(f"  {name:32s} {ms:9.3f} ms per step (all layers: load + P1 + routes)")
    print(f"  {'heterogeneous_sharding':32s} {result['ms_heterogeneous_sharding_all_layers']:9.3f} ms"
          " per re-shard (all layers)")


if __name__ == "__main__":
    main()
