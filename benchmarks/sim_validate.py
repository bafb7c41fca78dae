"""Validation 2 of the simulator: predicted vs measured ep / fssdp step-time ratios on this machine.

    .venv/bin/python benchmarks/sim_validate.py [--config tiny compute] [--repeats 3] [--json]

The machine is shared and its load changes by the second, so everything one comparison needs
is measured inside one task of 2 gloo ranks (1 torch thread each), under the same load:

1. calibration, as `hecate simulate --calibrate` does it (hecate.sim.calibrate: fused AdamW rate
   on rank 0, all_to_all_v alpha / beta between the two ranks; the GEMM rate from a short
   probe before every timed step on every rank, median), plus the model's
   per-step framework overhead: a third copy of the model stepped with every expert local
   (no collective), measured time minus what the FLOP model says;
2. ep and fssdp (benchmarks/strategies.py's model, batches and skew) trained side by side,
   their steps alternating (ep, fssdp, fssdp, ep, ...), each step timed between barriers
   on the slowest rank, every rank's routing counts recorded;
3. the step model (hecate.sim.step) predicts both step times on that calibration, the
   runtime's planner replaying the recorded counts (its planning time, on this host, charged
   to fssdp's step as in the runtime).

Reports measured ep / fssdp ratios (per repeat: the median over steps of the ratio of the two
back-to-back steps) and predicted ones, per repeat and their median (the target: within 20%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import prepare_spawn_env, zipf_bias  # noqa: E402

CONFIGS = {
    # benchmarks/strategies.py defaults (the tiny model) and the compute-bound model of docs/results.md
    "tiny": dict(layers=2, experts=16, top_k=2, d_model=64, ffn=128, vocab=512, seq=64, batch=16, skew_scale=0.03),
    "compute": dict(layers=2, experts=16, top_k=2, d_model=256, ffn=1024, vocab=512, seq=64, batch=64,
                    skew_scale=0.1),
}


def paired_case(rank, world, a, skew, warmup, steps):
    import copy

    import torch
    import torch.distributed as dist
    from strategies import model_config

    from hecate.comm.topology import Topology
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import build_strategy, moe_layers, parallelize
    from hecate.parallel.local import LocalStrategy
    from hecate.sim.calibrate import _link_task, adam_rate, gemm_rate
    from hecate.train.engine import Engine

    torch.set_num_threads(1)
    links = _link_task(rank, world, [64, 8 << 20], 7)
    rates = (gemm_rate(), adam_rate()) if rank == 0 else None
    torch.manual_seed(0)
    base = MoETransformer(model_config(a))
    bias_E = zipf_bias(a["experts"], scale=a["skew_scale"]) if skew else torch.zeros(a["experts"])
    for layer in moe_layers(base):
        layer.router.expert_bias_E.copy_(bias_E)
    runs = {}
    for name, options in (("ep", {}), ("fssdp", {"rematerialize": True})):
        topo = Topology()
        strat = build_strategy(name, topo, **options)
        model = parallelize(copy.deepcopy(base), strat)
        runs[name] = (model, Engine(model, strat, topo, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0))
    local_model = copy.deepcopy(base)
    runs["local"] = (local_model, Engine(local_model, LocalStrategy(), lr=1e-3, weight_decay=0.01,
                                         max_grad_norm=1.0))
    times = {"ep": [], "fssdp": [], "local": []}
    counts = {"ep": [], "fssdp": [], "local": []}
    probes = []  # GEMM rate measured right before every timed step: the same load as the steps
    pa, pb = torch.randn(1024, 256), torch.randn(256, 1024)
    for step in range(warmup + steps):
        g = torch.Generator().manual_seed(7919 * step + rank)
        tokens = torch.randint(0, a["vocab"], (a["batch"], a["seq"] + 1), generator=g)
        order = ("ep", "fssdp", "local") if step % 2 == 0 else ("local", "fssdp", "ep")
        for name in order:
            model, engine = runs[name]
            t = time.perf_counter()
            for _ in range(3):
                pa @ pb
            probes.append(3 * 2 * 1024 * 256 * 1024 / (time.perf_counter() - t))
            dist.barrier()
            start = time.perf_counter()
            loss, res = model.loss(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            engine.step()
            if name != "local":  # the local model is timed without waiting for the peer
                dist.barrier()
            elapsed = time.perf_counter() - start
            counts[name].append(torch.stack([s.tokens_per_expert_E for s in res.moe_stats]).tolist())
            if step >= warmup:
                times[name].append(elapsed)
    return {"times": times, "counts": counts, "links": links, "rates": rates, "probes": probes}


def _hardware(results):
    from hecate.sim.hardware import Hardware

    small = max(r["links"][64] for r in results)
    large = max(r["links"][8 << 20] for r in results)
    beta = ((8 << 20) - 64) / max(large - small, 1e-9)
    _, adam = results[0]["rates"]
    gemm = statistics.median(p for r in results for p in r["probes"])
    return Hardware("calibrated-in-run", 2, gemm_flops=gemm, adam_params_per_s=adam, alpha_intra=small,
                    bw_intra=beta, alpha_inter=small, bw_inter=beta, wire_bytes=4)


def one_repeat(a, skew, warmup, steps) -> dict:
    from strategies import model_config

    from hecate.sim.shape import shape_of_config
    from hecate.sim.step import StepSetup, simulate_steps
    from hecate.testing import run_distributed

    res = run_distributed(paired_case, 2, a, skew, warmup, steps, timeout=1800)
    hw = _hardware(res)
    slowest = {k: [max(r["times"][k][i] for r in res) for i in range(steps)] for k in ("ep", "fssdp")}
    measured = {k: statistics.median(v) for k, v in slowest.items()}
    # ep's and fssdp's step i ran back to back: the median of their ratios cancels slow load drift
    paired = statistics.median(e / f for e, f in zip(slowest["ep"], slowest["fssdp"]))
    shape = shape_of_config(model_config(a), "strategies.py")
    tokens = a["batch"] * a["seq"]
    # Framework time the FLOP model misses, from the same model stepped on one rank with every
    # expert local (no collective): measured minus modelled compute and optimizer.
    local = statistics.median(statistics.median(r["times"]["local"][warmup:]) for r in res)
    modelled = (3 * tokens * (shape.dense_flops_per_token() + shape.top_k * shape.expert_flops_per_entry())
                / hw.gemm_flops + (shape.dense_params + shape.routed_params) / hw.adam_params_per_s)
    setup = StepSetup(shape, hw, 2, tokens, overhead_s=max(local - modelled, 0.0))
    predicted, parts = {}, {}
    for name in ("ep", "fssdp"):
        trace = [[[r["counts"][name][s][l] for r in res] for l in range(a["layers"])]
                 for s in range(warmup + steps)]
        sim = simulate_steps(setup, trace, (name,), warmup=warmup)[name]
        predicted[name], parts[name] = sim["seconds"], sim["parts"]
    return {"measured_s": measured, "predicted_s": predicted, "measured_ratio": paired,
            "predicted_ratio": predicted["ep"] / predicted["fssdp"], "parts": parts,
            "hardware": {"gemm_flops": hw.gemm_flops, "adam_params_per_s": hw.adam_params_per_s,
                         "alpha": hw.alpha_intra, "beta": hw.bw_intra, "overhead_s": setup.overhead_s,
                         "local_step_s": local}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["tiny"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_spawn_env()
    rows = []
    for cfg in args.config:
        for skew in (False, True):
            reps = [one_repeat(CONFIGS[cfg], skew, args.warmup, args.steps) for _ in range(args.repeats)]
            m = statistics.median(r["measured_ratio"] for r in reps)
            p = statistics.median(r["predicted_ratio"] for r in reps)
            rows.append({"config": cfg, "routing": "skewed" if skew else "uniform", "repeats": reps,
                         "measured_ratio": m, "predicted_ratio": p, "relative_error": p / m - 1})
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print("| config | routing | measured ep/fssdp (median; repeats) | predicted ep/fssdp (median; repeats) | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = ", ".join(f"{x['measured_ratio']:.2f}" for x in r["repeats"])
        ps = ", ".join(f"{x['predicted_ratio']:.2f}" for x in r["repeats"])
        print(f"| {r['config']} | {r['routing']} | {r['measured_ratio']:.2f} ({ms}) | {r['predicted_ratio']:.2f} ({ps}) "
              f"| {r['relative_error'] * 100:+.0f}% |")


if __name__ == "__main__":
    main()
