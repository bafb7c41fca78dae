"""`hecate simulate`: rank FSSDP policies at cluster sizes that cannot run here.

Builds the cost model from a model shape and link speeds, replays synthetic skewed
routing through the real planners (hecate.sim.fssdp.simulate) and reports the
estimated MoE time per step of each policy and its speed-up over expert parallelism.
Estimates rank policies; they do not predict wall time.
"""
from __future__ import annotations

import argparse
import json

from hecate.parallel.fssdp.cost import CostModel
from hecate.sim.fssdp import Workload, simulate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64], help="world sizes to simulate")
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--ffn", type=int, default=1536, help="expert hidden size (paper: 2 d_model)")
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="token-expert assignments per rank")
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of expert popularity")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--intra-bw", type=float, default=150e9, help="bytes/s within a node")
    p.add_argument("--inter-bw", type=float, default=12.5e9, help="bytes/s across nodes (100 Gbps)")
    p.add_argument("--non-moe-ms", type=float, default=2.0, help="attention time a gather can hide behind")
    p.add_argument("--tflops", type=float, default=100.0, help="sustained expert-GEMM TFLOP/s per rank")
    p.add_argument("--memory-slots", type=int, default=None, help="m (default: ceil(E / W))")
    p.add_argument("--bytes-per-param", type=int, default=2)
    p.add_argument("--json", action="store_true")


def run(args) -> dict:
    for name in ("experts", "layers", "d_model", "ffn", "tokens_per_rank", "steps", "ranks_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    chunk_bytes = 2 * args.d_model * args.ffn * args.bytes_per_param
    # forward + backward of one token through one expert MLP: 3 x 2 GEMMs of 2*d*ffn flops
    token_s = 6 * 2 * args.d_model * args.ffn / (args.tflops * 1e12)
    cost = CostModel(intra_node_bw=args.intra_bw, inter_node_bw=args.inter_bw, chunk_bytes=chunk_bytes,
                     t_non_moe=args.non_moe_ms * 1e-3, token_compute_s=token_s,
                     token_bytes=args.d_model * args.bytes_per_param)
    workload = Workload(num_layers=args.layers, num_experts=args.experts,
                        tokens_per_rank=args.tokens_per_rank, zipf_skew=args.skew)
    results = []
    for W in args.ranks:
        if W % args.ranks_per_node and W > args.ranks_per_node:
            raise ValueError(f"--ranks {W} is not a multiple of --ranks-per-node {args.ranks_per_node}")
        rpn = min(args.ranks_per_node, W)
        m = args.memory_slots or -(-args.experts // W)
        results.append(simulate(cost, workload, num_ranks=W, ranks_per_node=rpn, capacity_m=m,
                                steps=args.steps, reshard_every=max(1, args.steps // 2)))
    return {"chunk_bytes": chunk_bytes, "results": results}


def main(args) -> int:
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Estimated MoE time per step ({args.layers} layers, {args.experts} experts, "
                        f"Zipf {args.skew})")
    for col in ("ranks", "t", "m", "ep ms", "shadowing ms", "hecate ms", "shadowing x", "hecate x"):
        table.add_column(col, justify="right")
    for r in out["results"]:
        s, x = r["seconds_per_step"], r["speedup_vs_ep"]
        table.add_row(str(r["num_ranks"]), str(r["overlap_degree"]), str(r["capacity_m"]),
                      f"{s['ep'] * 1e3:.2f}", f"{s['shadowing'] * 1e3:.2f}", f"{s['hecate'] * 1e3:.2f}",
                      f"{x['shadowing']:.2f}", f"{x['hecate']:.2f}")
    Console().print(table)
    print("Cost-model estimates that rank policies; they do not predict wall time.")
    return 0
