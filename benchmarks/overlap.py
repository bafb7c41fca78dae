"""How much of FSSDP's communication the asynchronous issue hides behind compute.

Runs the same small MoE transformer under fssdp with overlap off (blocking spAG and
spRS) and on (prefetch: layer l+1's spAG issued at the end of layer l's forward;
overlap_reduce: spRS issued asynchronously in backward; the re-materialization
re-gather of layer l-1 issued during layer l's backward), in one run, and prints the
seconds per step blocked in each (blocking: inside the call; overlapped: the wait),
the hidden fraction, and the step-time ratio. Only MoE layers after the first can be
prefetched, so the model has 4.

    python benchmarks/overlap.py [--nproc 2] [--steps 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_case(rank, world, overlap_reduce, steps, d_model, experts):
    import torch

    from hecate.comm.topology import Topology
    from hecate.models.transformer import MoETransformer, TransformerConfig
    from hecate.moe.config import MoEConfig
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.engine import Engine

    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=d_model, ffn_hidden_size=2 * d_model, num_experts=experts, top_k=2)
    cfg = TransformerConfig(vocab_size=256, d_model=d_model, n_layers=4, n_heads=4, max_seq_len=64,
                            dense_ffn_hidden=2 * d_model, moe_every=1, moe=moe)
    strat = build_strategy("fssdp", Topology(), overlap_degree=2, overlap_reduce=overlap_reduce,
                           prefetch=overlap_reduce, fit_replicas=False)
    model = parallelize(MoETransformer(cfg), strat)
    engine = Engine(model, strat, strat.topology, lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps):
        tokens = torch.randint(0, 256, (4, 65), generator=g)
        start = time.perf_counter()
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        engine.step()
        times.append(time.perf_counter() - start)
        if step == 1:  # warm-up done: reset the counters
            strat.timings.collect(wait=True)  # GPU intervals still in flight count as warm-up
            strat.timings.update({k: 0 for k in strat.timings})
    measured = steps - 2
    strat.timings.collect(wait=True)  # add the last steps' GPU intervals (CUDA events)
    keys = ("blocking_reduce_s", "exposed_reduce_s", "blocking_gather_s", "exposed_gather_s",
            "blocking_regather_s", "exposed_regather_s")
    out = {k: strat.timings.get(k, 0.0) / measured for k in keys}
    out["step_s"] = statistics.median(times[2:])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from hecate.testing import run_distributed

    result = {}
    for overlap in (False, True):
        per_rank = run_distributed(run_case, args.nproc, overlap, args.steps, args.d_model, args.experts,
                                   timeout=600)
        result["overlap" if overlap else "blocking"] = {
            k: max(r[k] for r in per_rank) for k in per_rank[0]}
    for what in ("reduce", "gather", "regather"):
        blocking = result["blocking"][f"blocking_{what}_s"]
        # With overlap on, the first MoE layer's gather and the last one's re-gather still
        # block (nothing to prefetch them behind): count them as exposed too.
        exposed = result["overlap"][f"exposed_{what}_s"] + result["overlap"][f"blocking_{what}_s"]
        result[f"hidden_fraction_{what}"] = 1.0 - exposed / blocking if blocking > 0 else None
        print(f"{what}: blocked {blocking * 1e3:.2f} ms/step without overlap, "
              f"{exposed * 1e3:.2f} ms/step exposed with it "
              f"(hidden {100 * (result[f'hidden_fraction_{what}'] or 0):.0f}%)")
    result["step_time_ratio_blocking_over_overlap"] = result["blocking"]["step_s"] / result["overlap"]["step_s"]
    print(f"step time blocking / overlap = {result['step_time_ratio_blocking_over_overlap']:.3f} "
          f"(nproc {args.nproc})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
