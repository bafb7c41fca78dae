"""Validation 2 of the simulator: predicted vs measured ep / fssdp step-time ratios on this machine.

    .venv/bin/python benchmarks/sim_validate.py [--config tiny compute] [--repeats 3] [--json]

The machine is shared and its load changes by the second, so everything one comparison needs
is measured inside one task of 2 gloo ranks (1 torch thread each), each step of it interleaved
with the others so that all of them see the same load:

1. the machine (hecate.sim.calibrate): fused AdamW rate on rank 0; before every step, a GEMM
   probe on every rank and two all_to_all_v probes (64 B and 1 MiB per peer: alpha, beta);
2. the framework terms (hecate.sim.calibrate.framework_costs): separate copies of the model
   trained under local, ep, fssdp without replicas and fssdp with replicas on
   CALIBRATION_TOKENS tokens per rank, uniform routing, their own batches;
3. ep and fssdp (benchmarks/strategies.py's model, batches and skew) trained side by side with
   a local copy, their steps alternating (ep, fssdp, local, then local, fssdp, ep), each step
   timed between barriers on the slowest rank, every rank's routing counts recorded; the local
   copy's excess over its FLOPs is the framework time every strategy shares (overhead_s);
4. the step model (hecate.sim.step) predicts both step times from 1-3, the runtime's planner
   replaying the recorded counts (its planning time, on this host, charged to fssdp's step as
   in the runtime).

Reports measured ep / fssdp ratios (per repeat: the median over steps of the ratio of the two
back-to-back steps) and predicted ones, per repeat and their median (the target: within 20%),
and the load average before and after each configuration.
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

LINK_PROBE_BYTES = (64, 1 << 20)  # all_to_all_v bytes per peer of the alpha and beta probes
CONFIGS = {
    # benchmarks/strategies.py defaults (the tiny model) and the compute-bound model of docs/results.md
    "tiny": dict(layers=2, experts=16, top_k=2, d_model=64, ffn=128, vocab=512, seq=64, batch=16, skew_scale=0.03),
    "compute": dict(layers=2, experts=16, top_k=2, d_model=256, ffn=1024, vocab=512, seq=64, batch=64,
                    skew_scale=0.1),
}


def paired_case(rank, world, a, skew, warmup, steps):
    import torch
    from strategies import model_config

    from hecate.sim.calibrate import CALIBRATION_TOKENS, CaseSteps, adam_rate, link_probe

    torch.set_num_threads(1)
    adam = adam_rate() if rank == 0 else None
    cfg = model_config(a)
    # Calibration of the framework terms (hecate.sim.calibrate.framework_costs): its own copies
    # of the model, uniform routing, CALIBRATION_TOKENS per rank; not the runs predicted below.
    calibration = {batch * seq: CaseSteps(cfg, batch, seq) for batch, seq in CALIBRATION_TOKENS}
    bias_E = zipf_bias(a["experts"], scale=a["skew_scale"]) if skew else None
    runs = CaseSteps(cfg, a["batch"], a["seq"], {"ep": ("ep", {}), "fssdp": ("fssdp", {"rematerialize": True}),
                                                 "local": ("local", {})}, bias_E)
    gemm, links = [], []
    pa, pb = torch.randn(1024, 256), torch.randn(256, 1024)
    for step in range(warmup + steps):
        # Probes, calibration steps and the predicted runs' steps interleave: the same load.
        t = time.perf_counter()
        for _ in range(3):
            pa @ pb
        gemm.append(3 * 2 * 1024 * 256 * 1024 / (time.perf_counter() - t))
        links.append(link_probe(world, LINK_PROBE_BYTES))
        for case in calibration.values():
            case.step(step)
        runs.step(step)
    return {"runs": runs.result(), "framework": {n: c.result() for n, c in calibration.items()}, "links": links,
            "gemm": gemm, "adam": adam}


def _hardware(results):
    """The machine as measured by the probes of the run: alpha = the small all_to_all_v, beta =
    the extra bytes of the large one over its extra time (medians over steps of the slowest rank)."""
    from hecate.sim.hardware import Hardware

    small, large = LINK_PROBE_BYTES
    n = len(results[0]["links"])
    t_small = statistics.median(max(r["links"][i][small] for r in results) for i in range(n))
    t_large = statistics.median(max(r["links"][i][large] for r in results) for i in range(n))
    beta = (large - small) / max(t_large - t_small, 1e-9)
    gemm = statistics.median(p for r in results for p in r["gemm"])
    return Hardware("calibrated-in-run", 2, gemm_flops=gemm, adam_params_per_s=results[0]["adam"],
                    alpha_intra=t_small, bw_intra=beta, alpha_inter=t_small, bw_inter=beta, wire_bytes=4)


def one_repeat(a, skew, warmup, steps) -> dict:
    import dataclasses

    from strategies import model_config

    from hecate.sim.calibrate import framework_costs, local_excess_s
    from hecate.sim.shape import shape_of_config
    from hecate.sim.step import StepSetup, simulate_steps
    from hecate.testing import run_distributed

    res = run_distributed(paired_case, 2, a, skew, warmup, steps, timeout=1800)
    hw = _hardware(res)
    slowest = {k: [max(r["runs"]["times"][k][i] for r in res) for i in range(warmup, warmup + steps)]
               for k in ("ep", "fssdp")}
    measured = {k: statistics.median(v) for k, v in slowest.items()}
    # ep's and fssdp's step i ran back to back: the median of their ratios cancels slow load drift
    paired = statistics.median(e / f for e, f in zip(slowest["ep"], slowest["fssdp"]))
    shape = shape_of_config(model_config(a), "strategies.py")
    tokens = a["batch"] * a["seq"]
    # Framework time the FLOP model misses, shared by every strategy: the same model stepped on
    # one rank with every expert local (no collective), measured minus modelled compute and optimizer.
    local = statistics.median(max(r["runs"]["times"]["local"][i] for r in res) for i in range(warmup, warmup + steps))
    # Each strategy's own per-MoE-layer framework time: from the calibration cases' small steps.
    fw = framework_costs({n: [r["framework"][n] for r in res] for n in res[0]["framework"]}, model_config(a), hw,
                         warmup)
    hw = dataclasses.replace(hw, framework_s=fw["framework_s"])
    # The replay plans with the options the run's planner resolved (gloo's default bandwidth and
    # collective latency), not the calibrated figures: the same plans as the run.
    setup = StepSetup(shape, hw, 2, tokens, fssdp_options=res[0]["runs"]["planner"]["fssdp"],
                      overhead_s=max(local_excess_s(local, shape, hw, tokens), 0.0))
    predicted, parts, calls = {}, {}, {}
    for name in ("ep", "fssdp"):
        trace = [[[r["runs"]["counts"][name][s][l] for r in res] for l in range(a["layers"])]
                 for s in range(warmup + steps)]
        sim = simulate_steps(setup, trace, (name,), warmup=warmup)[name]
        predicted[name], parts[name] = sim["seconds"], sim["parts"]
        # collectives per step: the model's count against what CommStats counted on rank 0
        calls[name] = {"predicted": sim["calls"], "measured": statistics.mean(res[0]["runs"]["calls"][name][warmup:])}
    return {"measured_s": measured, "predicted_s": predicted, "measured_ratio": paired,
            "predicted_ratio": predicted["ep"] / predicted["fssdp"], "parts": parts, "calls_per_step": calls,
            "hardware": {"gemm_flops": hw.gemm_flops, "adam_params_per_s": hw.adam_params_per_s,
                         "alpha": hw.alpha_intra, "beta": hw.bw_intra, "overhead_s": setup.overhead_s,
                         "local_step_s": local, "framework_s": fw["framework_s"], "framework_raw_s": fw["raw_s"]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["tiny"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_spawn_env()
    rows, start = [], time.perf_counter()
    for cfg in args.config:
        for skew in (False, True):
            load = [os.getloadavg()[0]]
            reps = [one_repeat(CONFIGS[cfg], skew, args.warmup, args.steps) for _ in range(args.repeats)]
            load.append(os.getloadavg()[0])
            m = statistics.median(r["measured_ratio"] for r in reps)
            p = statistics.median(r["predicted_ratio"] for r in reps)
            rows.append({"config": cfg, "routing": "skewed" if skew else "uniform", "repeats": reps,
                         "measured_ratio": m, "predicted_ratio": p, "relative_error": p / m - 1,
                         "load_average": load})
    wall = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": rows, "wall_s": wall}))
        return
    print("| config | routing | measured ep/fssdp (median; repeats) | predicted ep/fssdp (median; repeats) | error "
          "| load average (1 min, before / after) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ms = ", ".join(f"{x['measured_ratio']:.2f}" for x in r["repeats"])
        ps = ", ".join(f"{x['predicted_ratio']:.2f}" for x in r["repeats"])
        print(f"| {r['config']} | {r['routing']} | {r['measured_ratio']:.2f} ({ms}) "
              f"| {r['predicted_ratio']:.2f} ({ps}) "
              f"| {r['relative_error'] * 100:+.0f}% | {r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} |")
    print(f"\n{wall:.0f} s wall")


if __name__ == "__main__":
    main()
