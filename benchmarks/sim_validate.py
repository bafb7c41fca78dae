"""Validation 2 of the simulator: predicted vs measured ep / fssdp step-time ratios on this machine.

    .venv/bin/python -m hecate.cli simulate --calibrate          # measure this host first
    .venv/bin/python benchmarks/sim_validate.py [--config tiny|compute] [--repeats 2] [--json]

Runs ep and fssdp side by side with benchmarks/strategies.py's own `bench_case` (same model,
batches and skew, 2 ranks, 1 thread each), records every rank's routing counts of the measured
steps, then predicts both step times with the step model (hecate.sim.step) on the calibrated
Hardware and the runtime's planner replaying those counts. Reports measured and predicted
ep / fssdp ratios and their relative error (the target: within 20%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _common import prepare_spawn_env  # noqa: E402

CONFIGS = {
    # benchmarks/strategies.py defaults (the tiny model) and the compute-bound model of docs/results.md
    "tiny": dict(layers=2, experts=16, top_k=2, d_model=64, ffn=128, vocab=512, seq=64, batch=16, skew_scale=0.03),
    "compute": dict(layers=2, experts=16, top_k=2, d_model=256, ffn=1024, vocab=512, seq=64, batch=64,
                    skew_scale=0.1),
}


def measure(a: dict, skew: bool, warmup: int, steps: int, repeats: int) -> dict:
    from hecate.testing import run_distributed
    from strategies import bench_case

    times = {"ep": [], "fssdp": []}
    counts = None
    for _ in range(repeats):
        for name, options in (("ep", {}), ("fssdp", {"rematerialize": True})):
            res = run_distributed(bench_case, 2, a, name, name, options, skew, warmup, steps, timeout=900)
            times[name] += [max(r["times"][i] for r in res) for i in range(steps)]
            if name == "fssdp" and counts is None:  # [step][layer] -> [W, E]
                counts = [[[r["counts"][s][l] for r in res] for l in range(a["layers"])] for s in range(steps)]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_s": med, "ratio": med["ep"] / med["fssdp"], "counts": counts}


def predict(a: dict, counts, hw) -> dict:
    from strategies import model_config

    from hecate.sim.shape import shape_of_config
    from hecate.sim.step import StepSetup, simulate_steps

    shape = shape_of_config(model_config(a), "strategies.py")
    setup = StepSetup(shape, hw, 2, a["batch"] * a["seq"])
    sim = simulate_steps(setup, counts, ("ep", "fssdp"), warmup=1)
    step = {k: v["seconds"] for k, v in sim.items()}
    return {"step_s": step, "ratio": step["ep"] / step["fssdp"], "parts": {k: v["parts"] for k, v in sim.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), nargs="+", default=["tiny"])
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_spawn_env()
    from hecate.sim.hardware import get_hardware

    hw = get_hardware("calibrated", args.calibration)
    rows = []
    for cfg in args.config:
        a = {**CONFIGS[cfg], "threads": args.threads}
        for skew in (False, True):
            m = measure(a, skew, args.warmup, args.steps, args.repeats)
            p = predict(a, m.pop("counts"), hw)
            rows.append({"config": cfg, "routing": "skewed" if skew else "uniform", "measured": m, "predicted": p,
                         "relative_error": p["ratio"] / m["ratio"] - 1})
    if args.json:
        print(json.dumps({"hardware": hw.name, "note": hw.note, "rows": rows}))
        return
    print("| config | routing | measured ep ms | measured fssdp ms | measured ep/fssdp | predicted ep ms | "
          "predicted fssdp ms | predicted ep/fssdp | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        print(f"| {r['config']} | {r['routing']} | {m['step_s']['ep'] * 1e3:.0f} | {m['step_s']['fssdp'] * 1e3:.0f} | "
              f"{m['ratio']:.2f} | {p['step_s']['ep'] * 1e3:.0f} | {p['step_s']['fssdp'] * 1e3:.0f} | "
              f"{p['ratio']:.2f} | {r['relative_error'] * 100:+.0f}% |")


if __name__ == "__main__":
    main()
