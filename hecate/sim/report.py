"""`hecate simulate`: predicted step time and memory per rank of ep, fsdp and fssdp at cluster scale.

The step model (hecate.sim.step) runs the runtime's own fssdp planner on a routing trace: a
synthetic one (Zipf-skewed expert popularity drifting from step to step, the default) or one
recorded by `hecate train --set logging.trace=FILE` (`--trace FILE`). Hardware comes from a
preset or from `--calibrate`, which measures this machine (hecate.sim.calibrate).
To keep 1024-rank runs short, `--sample-layers` MoE layers are planned and repeated over the
model's MoE layers (their routing is statistically alike in a synthetic trace).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import yaml

from hecate.sim.hardware import PRESETS, get_hardware, with_ranks_per_node
from hecate.sim.step import STRATEGIES, StepSetup, simulate_steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-moe-s", help="model-zoo preset (e.g. gpt-moe-s, gpt-moe-l, deepseekmoe-16b)")
    p.add_argument("--config", default=None, help="take the model from this training config instead of --model")
    p.add_argument("--hardware", default="h100-ib400",
                   help=f"hardware preset ({', '.join(sorted(PRESETS))}) or 'calibrated'")
    p.add_argument("--calibration", default=None, help="calibration file (default ~/.cache/hecate/calibration.json)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine (GEMM rate, AdamW rate, gloo latency / bandwidth) and save it")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64], help="world sizes to simulate")
    p.add_argument("--ranks-per-node", type=int, default=None, help="override the hardware's ranks per node")
    p.add_argument("--experts", type=int, default=None, help="override the model's experts per MoE layer")
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="tokens per rank per step")
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the synthetic expert popularity")
    p.add_argument("--drift", type=float, default=0.05, help="per-step drift of the synthetic popularity")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="steps that only build fssdp's load history")
    p.add_argument("--sample-layers", type=int, default=2, help="MoE layers planned per step (repeated)")
    p.add_argument("--memory-slots", type=int, default=None, help="fssdp m (default 2 * ceil(E / W))")
    p.add_argument("--fssdp-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a parallel.fssdp option for the fssdp plans (e.g. fit_replicas=false); repeatable")
    p.add_argument("--strategies", nargs="+", default=["ep", "fsdp", "fssdp"], choices=list(STRATEGIES))
    p.add_argument("--shard-group-size", type=int, default=None,
                   help="fssdp_hybrid's shard group G (default: the ranks of one node)")
    p.add_argument("--trace", default=None, help="routing trace recorded by `hecate train --set logging.trace=FILE`")
    p.add_argument("--plot", default=None, help="write a PNG of speed-ups and memory against ranks")
    p.add_argument("--json", action="store_true")


def _check(args) -> None:
    for name in ("tokens_per_rank", "steps", "sample_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if any(w < 1 for w in args.ranks):
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")


def synthetic_trace(num_layers: int, num_experts: int, entries_per_rank: int, world_size: int, steps: int,
                    skew: float, drift: float, seed: int = 0) -> list:
    from hecate.sim.fssdp import Workload, _counts_stream

    wl = Workload(num_layers=num_layers, num_experts=num_experts, tokens_per_rank=entries_per_rank,
                  zipf_skew=skew, drift=drift, seed=seed)
    return [[c.numpy() for c in layers] for layers in _counts_stream(wl, world_size, steps)]


def memory_per_rank(model, strategy: str, world: int, memory_slots=None, group: int = 0) -> int:
    from hecate.train.model_stats import expert_state_estimate

    if strategy == "fssdp_hybrid":  # experts sharded over the shard group; dense AdamW replicated
        return expert_state_estimate(model, "fssdp", group, memory_slots=memory_slots,
                                     dense_optimizer="replicated")["total_bytes"]
    return expert_state_estimate(model, strategy, world, memory_slots=memory_slots)["total_bytes"]


def run(args) -> dict:
    _check(args)
    from hecate.models.registry import build_model, get_preset
    from hecate.sim.shape import shape_of_preset

    if args.config:  # the model of a training config (e.g. the one a --trace was recorded with)
        from hecate.sim.shape import shape_of_config
        from hecate.train.config import load_config
        from hecate.train.model_stats import build_meta_model

        model_cfg = load_config(args.config).model
        if args.experts:
            model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, num_experts=args.experts))
        shape, meta = shape_of_config(model_cfg, args.config), build_meta_model(model_cfg)
        args.model = args.config
    else:
        shape = shape_of_preset(args.model)
        preset = get_preset(args.model)
        cfg = dict(preset.config)
        if args.experts:
            shape = dataclasses.replace(shape, num_experts=args.experts)
            cfg["moe"] = {**cfg["moe"], "num_experts": args.experts}
        meta = build_model(preset.arch, cfg, device="meta")
    hw = with_ranks_per_node(get_hardware(args.hardware, args.calibration), args.ranks_per_node)
    fssdp_opts = {"memory_slots": args.memory_slots} if args.memory_slots else {}
    for item in args.fssdp_option:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--fssdp-option {item!r} must be KEY=VALUE (e.g. fit_replicas=false)")
        fssdp_opts[key] = yaml.safe_load(value)
    trace = None
    if args.trace:
        from hecate.train.routing_trace import read_routing_trace

        trace = read_routing_trace(args.trace)
        if set(trace.num_experts) != {shape.num_experts}:
            raise ValueError(f"--trace has {trace.num_experts} experts per layer but --model {args.model} has "
                             f"{shape.num_experts}; pass the model the trace was recorded with (or --experts)")
        ranks = [trace.world_size]
        if args.ranks_per_node is None:
            hw = with_ranks_per_node(hw, trace.ranks_per_node)
    else:
        ranks = args.ranks
    results = []
    for W in ranks:
        if W > hw.ranks_per_node and W % hw.ranks_per_node:
            raise ValueError(f"--ranks {W} is not a multiple of the {hw.ranks_per_node} ranks per node "
                             f"of --hardware {hw.name} (or --ranks-per-node)")
        if "ep" in args.strategies and shape.num_experts % W and W % shape.num_experts:
            raise ValueError(f"ep needs --ranks {W} to divide the {shape.num_experts} experts (or be a multiple)")
        t0 = time.perf_counter()
        if trace is not None:
            steps = [list(s) for s in trace.steps]
            tokens = int(np.asarray(steps[0][0]).sum(1).mean()) // shape.top_k
            warmup = min(args.warmup, len(steps) - 1)
        else:
            tokens, warmup = args.tokens_per_rank, args.warmup
            steps = synthetic_trace(min(args.sample_layers, len(shape.moe_layers)), shape.num_experts,
                                    tokens * shape.top_k, W, warmup + args.steps, args.skew, args.drift)
        setup = StepSetup(shape, hw, W, tokens, fssdp_opts, hybrid_group=args.shard_group_size or 0)
        strategies = list(args.strategies)
        sim = simulate_steps(setup, steps, strategies, warmup=warmup)
        r = {"num_ranks": W, "ranks_per_node": setup.ranks_per_node, "tokens_per_rank": tokens,
             "seconds_per_step": {k: v["seconds"] for k, v in sim.items()},
             "parts": {k: v["parts"] for k, v in sim.items()},
             "memory_per_rank_bytes": {k: memory_per_rank(meta, k, W, args.memory_slots,
                                                          min(args.shard_group_size or hw.ranks_per_node, W))
                                       for k in strategies},
             "wall_s": time.perf_counter() - t0}
        sec = r["seconds_per_step"]
        if "fssdp" in sec:
            r["fssdp_speedup"] = {k: sec[k] / sec["fssdp"] for k in sec if k != "fssdp"}
        if "fssdp_hybrid" in sec:
            r["hybrid_speedup"] = {k: sec[k] / sec["fssdp_hybrid"] for k in sec if k != "fssdp_hybrid"}
        results.append(r)
    out = {"model": args.model, "hardware": dataclasses.asdict(hw), "num_experts": shape.num_experts,
           "moe_layers": len(shape.moe_layers), "sampled_layers": min(args.sample_layers, len(shape.moe_layers)),
           "trace": args.trace, "results": results}
    if args.plot:
        plot(out, args.plot)
    return out


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    W = [r["num_ranks"] for r in res]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("fssdp_speedup", "fssdp"), ("hybrid_speedup", "fssdp_hybrid")):
        for base in ("ep", "fsdp"):
            ys = [r.get(key, {}).get(base) for r in res]
            if any(y is not None for y in ys):
                a.plot(W, ys, marker="o", label=f"{label} over {base}")
    a.axhline(1.0, color="grey", lw=0.8)
    a.set_xscale("log", base=2)
    a.set_yscale("log", base=2)
    a.set_xlabel("ranks")
    a.set_ylabel("predicted step-time speed-up")
    a.legend()
    for k in ("ep", "fsdp", "fssdp", "fssdp_hybrid"):
        ys = [r["memory_per_rank_bytes"].get(k) for r in res]
        if any(y is not None for y in ys):
            b.plot(W, [y / 2**30 if y else None for y in ys], marker="o", label=k)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("ranks")
    b.set_ylabel("GiB per rank (state + one layer's experts)")
    b.legend()
    fig.suptitle(f"{out['model']} on {out['hardware']['name']} (simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    if args.calibrate:
        from hecate.sim.calibrate import calibrate

        hw = calibrate(args.calibration)
        print(hw.to_json())
        return 0
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    hw = out["hardware"]
    table = Table(title=f"{out['model']} on {hw['name']} ({hw['ranks_per_node']} ranks/node): predicted step")
    hybrid = any("fssdp_hybrid" in r["seconds_per_step"] for r in out["results"])
    cols = ["ranks", "ep ms", "fsdp ms", "fssdp ms"] + (["hybrid ms"] if hybrid else []) + [
        "fssdp vs ep", "fssdp vs fsdp"] + (["hybrid vs ep"] if hybrid else []) + ["GiB/rank ep / fsdp / fssdp"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in out["results"]:
        s, x, m = r["seconds_per_step"], r.get("fssdp_speedup", {}), r["memory_per_rank_bytes"]

        def ms(k):
            return f"{s[k] * 1e3:.1f}" if k in s else "-"

        def sp(k):
            return f"{x[k]:.2f}x" if k in x else "-"

        mem = " / ".join(f"{m[k] / 2**30:.1f}" if k in m else "-" for k in ("ep", "fsdp", "fssdp"))
        row = [str(r["num_ranks"]), ms("ep"), ms("fsdp"), ms("fssdp")] + ([ms("fssdp_hybrid")] if hybrid else [])
        row += [sp("ep"), sp("fsdp")]
        if hybrid:
            row.append(f"{s['ep'] / s['fssdp_hybrid']:.2f}x" if "ep" in s and "fssdp_hybrid" in s else "-")
        table.add_row(*row, mem)
    Console().print(table)
    print(f"{out['sampled_layers']} of {out['moe_layers']} MoE layers planned per step and repeated; "
          "a model of the step (docs/simulate.md), validated as docs/results.md reports.")
    return 0
