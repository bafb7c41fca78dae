"""The simulator's paper comparison (validation 3) and its projection to 1024 GPUs.

    .venv/bin/python benchmarks/sim_scale.py --paper        # GPT-MoE-S/L, 16 and 32 GPUs, paper clusters
    .venv/bin/python benchmarks/sim_scale.py --sensitivity  # the same, one assumption changed at a time
    .venv/bin/python benchmarks/sim_scale.py --projection --plot docs/img/sim_projection.png

All call `hecate simulate`'s own code (hecate.sim.report.run) and print markdown tables.
Paper setups follow its weak scaling (32 experts on 16 GPUs, 64 on 32); tokens per GPU
(8192), routing skew (Zipf 1.2 with drift) and link figures marked "(ours)" in
hecate/sim/hardware.py are our assumptions.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from types import SimpleNamespace


def _args(**kw):
    base = dict(model="gpt-moe-s", config=None, hardware="h100-ib400", calibration=None, calibrate=False,
                ranks=[16], ranks_per_node=None, experts=None, tokens_per_rank=8192, skew=1.2, drift=0.05,
                steps=3, warmup=3, sample_layers=2, memory_slots=None, fssdp_option=[], shard_group_size=None,
                strategies=["ep", "fsdp", "fssdp"], trace=None, plot=None, json=True)
    base.update(kw)
    return SimpleNamespace(**base)


def paper() -> list[dict]:
    from hecate.sim.report import run

    rows = []
    for hw in ("v100-100g", "a100-400g"):
        for model in ("gpt-moe-s", "gpt-moe-l"):
            for W, E in ((16, 32), (32, 64)):
                out = run(_args(model=model, hardware=hw, ranks=[W], experts=E))
                r = out["results"][0]
                rows.append({"hardware": hw, "model": model, "gpus": W, "experts": E,
                             "step_ms": {k: v * 1e3 for k, v in r["seconds_per_step"].items()},
                             "speedup_vs_ep": r["fssdp_speedup"]["ep"], "parts": r["parts"]})
    print("| cluster | model | GPUs | experts | ep ms | fssdp ms | predicted speed-up over ep | paper (end to end) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["step_ms"]
        print(f"| {r['hardware']} | {r['model']} | {r['gpus']} | {r['experts']} | {s['ep']:.0f} | {s['fssdp']:.0f} | "
              f"{r['speedup_vs_ep']:.2f}x | 1.26-1.78x |")
    return rows


def sensitivity() -> list[dict]:
    """GPT-MoE-S and -L on the paper's setups with one assumption changed at a time: tokens per GPU,
    the inter-node bandwidth per GPU (one NIC per node, ours, or one per GPU) and the routing
    skew. The paper's evaluation section (its batch, its NICs, its measured loads) is not in
    our notes, so these are the values it could have used."""
    import dataclasses
    import tempfile

    from hecate.sim.hardware import PRESETS
    from hecate.sim.report import run

    rows = []
    variants = [("ours", {}), ("4096 tokens/GPU", {"tokens_per_rank": 4096}),
                ("16384 tokens/GPU", {"tokens_per_rank": 16384}), ("NIC per GPU", {"nic_per_gpu": True}),
                ("Zipf 0.8", {"skew": 0.8}), ("Zipf 1.6", {"skew": 1.6})]
    with tempfile.TemporaryDirectory() as tmp:
        for model, hw, (W, E) in itertools.product(("gpt-moe-s", "gpt-moe-l"), ("v100-100g", "a100-400g"),
                                                    ((16, 32), (32, 64))):
            for label, change in variants:
                kw = {k: v for k, v in change.items() if k != "nic_per_gpu"}
                if change.get("nic_per_gpu"):
                    preset = PRESETS[hw]
                    fast = dataclasses.replace(preset, name=f"{hw}-nic-per-gpu",
                                               bw_inter=preset.bw_inter * preset.ranks_per_node)
                    path = f"{tmp}/{hw}.json"
                    with open(path, "w") as f:
                        f.write(fast.to_json())
                    kw.update(hardware="calibrated", calibration=path)
                else:
                    kw["hardware"] = hw
                r = run(_args(model=model, ranks=[W], experts=E, strategies=["ep", "fssdp"], **kw))
                r = r["results"][0]
                rows.append({"model": model, "hardware": hw, "gpus": W, "experts": E, "variant": label,
                             "step_ms": {k: v * 1e3 for k, v in r["seconds_per_step"].items()},
                             "speedup_vs_ep": r["fssdp_speedup"]["ep"]})
    labels = [label for label, _ in variants]
    print("| model | cluster | GPUs | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for i in range(0, len(rows), len(labels)):
        r = rows[i]
        cells = " | ".join(f"{x['speedup_vs_ep']:.2f}x" for x in rows[i:i + len(labels)])
        print(f"| {r['model']} | {r['hardware']} | {r['gpus']} | {cells} |")
    return rows


def projection(plot_path: str | None) -> list[dict]:
    from hecate.sim.report import plot, run

    ranks = [16, 32, 64, 128, 256, 512, 1024]
    outs = []
    for model in ("gpt-moe-l", "deepseekmoe-16b"):
        out = run(_args(model=model, hardware="h200-ib400", ranks=ranks,
                        strategies=["ep", "fsdp", "fssdp", "fssdp_hybrid"]))
        outs.append(out)
        if plot_path:
            plot(out, plot_path.replace(".png", f"_{model}.png"))
    print("| model | GPUs | ep ms | fsdp ms | fssdp ms | hybrid ms | fssdp vs ep | fssdp vs fsdp | hybrid vs ep | "
          "hybrid vs fsdp | GiB/rank ep / fsdp / fssdp / hybrid | sim s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for out in outs:
        for r in out["results"]:
            s, x, m = r["seconds_per_step"], r["fssdp_speedup"], r["memory_per_rank_bytes"]
            h = r["hybrid_speedup"]
            print(f"| {out['model']} | {r['num_ranks']} | {s['ep'] * 1e3:.0f} | {s['fsdp'] * 1e3:.0f} | "
                  f"{s['fssdp'] * 1e3:.0f} | {s['fssdp_hybrid'] * 1e3:.0f} | {x['ep']:.2f}x | {x['fsdp']:.2f}x | "
                  f"{h['ep']:.2f}x | {h['fsdp']:.2f}x | "
                  + " / ".join(f"{m[k] / 2**30:.1f}" for k in ("ep", "fsdp", "fssdp", "fssdp_hybrid"))
                  + f" | {r['wall_s']:.1f} |")
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper", action="store_true")
    ap.add_argument("--projection", action="store_true")
    ap.add_argument("--sensitivity", action="store_true",
                    help="the paper setups with one assumption changed at a time (predicted fssdp speed-up over ep)")
    ap.add_argument("--plot", default=None, help="PNG path prefix for the projection plots")
    ap.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    a = ap.parse_args()
    if not (a.paper or a.projection or a.sensitivity):
        ap.error("pass --paper, --sensitivity and/or --projection")
    raw = {}
    if a.paper:
        raw["paper"] = paper()
    if a.sensitivity:
        raw["sensitivity"] = sensitivity()
    if a.projection:
        raw["projection"] = projection(a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
