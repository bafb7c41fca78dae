"""One MoE layer, forward + backward: Hecate `ep` against DeepSpeed-MoE on the same ranks.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/moe_layer.py [--nproc 2] [--json]

Both sides get the same sizes, inputs, gate weights and torch threads per rank, on
gloo. Semantics are matched as far as the two allow: top-k softmax gate in fp32,
top-2 weights renormalized over the two picks (DeepSpeed's top2gating; Hecate
renormalize=True), top-1 weight = the softmax probability (Hecate renormalize=False),
no token dropping (Hecate dropless; DeepSpeed drop_tokens=False, which pads every
expert to the largest expert's load), no random token selection or 2nd-expert sampling
(use_rts=False, top2_2nd_expert_sampling=False), bias-free GELU expert MLPs.

Skewed routing: input feature 0 is the constant 1 and the gate's column 0 holds
`skew_scale * log(p_e)` for a Zipf(1.2) p (uniform: that column is 0), so both routers
see the same biased logits. DeepSpeed is optional: without it only Hecate runs and the
output says so.
"""
from __future__ import annotations

import argparse
import os
import time

from _common import emit, median, peak_bytes, prepare_spawn_env, reset_peak, rss_bytes, zipf_bias


def deepspeed_available() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install that fails at import
        return f"{type(exc).__name__}: {exc}"
    return None


def _inputs(a, rank, skew):
    import torch

    g = torch.Generator().manual_seed(1234 + rank)
    x_TD = torch.randn(a["tokens"], a["d_model"], generator=g)
    x_TD[:, 0] = 1.0
    gw = torch.Generator().manual_seed(99)
    gate_ED = torch.empty(a["experts"], a["d_model"]).uniform_(-1, 1, generator=gw) / a["d_model"] ** 0.5
    gate_ED[:, 0] = zipf_bias(a["experts"], scale=a["skew_scale"]) if skew else 0.0
    return x_TD, gate_ED


def _hecate_layer(a, k, gate_ED):
    import torch

    from hecate.comm.topology import Topology
    from hecate.moe.config import MoEConfig
    from hecate.moe.layer import MoELayer
    from hecate.parallel import build_strategy, parallelize

    cfg = MoEConfig(hidden_size=a["d_model"], ffn_hidden_size=a["ffn"], num_experts=a["experts"], top_k=k,
                    renormalize=(k > 1), capacity_factor=None, aux_loss_coeff=0.01)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight_ED.copy_(gate_ED)
    strat = build_strategy("ep", Topology())
    layer.layer_id, layer.strategy = 0, strat
    strat.attach(layer)
    return layer, lambda x: (lambda o: o.y.sum() + o.aux_loss)(layer(x))


def _deepspeed_layer(a, k, gate_ED, world):
    import deepspeed
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo")
    expert = nn.Sequential(nn.Linear(a["d_model"], a["ffn"], bias=False), nn.GELU(),
                           nn.Linear(a["ffn"], a["d_model"], bias=False))  # Hecate experts have no biases
    layer = MoE(a["d_model"], expert, num_experts=a["experts"], ep_size=world, k=k, capacity_factor=1.0,
                min_capacity=0, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(gate_ED)

    def loss(x):
        y, l_aux, _ = layer(x.unsqueeze(0))
        return y.sum() + 0.01 * l_aux
    return layer, loss


def bench_layer(rank, world, a, impl, k, skew, warmup, iters):
    """Forward + backward of one layer on this rank's tokens; returns times and memory."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    x_TD, gate_ED = _inputs(a, rank, skew)
    layer, loss_fn = (_hecate_layer(a, k, gate_ED) if impl == "hecate"
                      else _deepspeed_layer(a, k, gate_ED, world))
    times, peaks = [], []
    for it in range(warmup + iters):
        x = x_TD.clone().requires_grad_(True)
        before = rss_bytes()
        reset_peak()
        dist.barrier()
        start = time.perf_counter()
        loss_fn(x).backward()
        dist.barrier()
        elapsed = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        if it >= warmup:
            times.append(elapsed)
            peaks.append(peak_bytes() - before)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return {"times": times, "step_peak": median(peaks), "param_bytes": params}


def summarize(res):
    n = len(res[0]["times"])
    per_iter = [max(r["times"][i] for r in res) for i in range(n)]
    return {"time_s": median(per_iter),
            "peak_bytes_per_rank": max(r["param_bytes"] + r["step_peak"] for r in res),
            "param_bytes_per_rank": max(r["param_bytes"] for r in res)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--skew-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (both sides)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-deepspeed", action="store_true", help="run the Hecate side only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_spawn_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    a = {"experts": args.experts, "d_model": args.d_model, "ffn": args.ffn, "tokens": args.tokens,
         "skew_scale": args.skew_scale, "threads": args.threads}
    missing = "disabled by --no-deepspeed" if args.no_deepspeed else deepspeed_available()
    if missing:
        print(f"DeepSpeed is NOT available ({missing}); measuring the Hecate side only. "
              "Install it with: pip install 'deepspeed>=0.19,<0.20' (keep the CPU torch).", flush=True)
    from hecate.testing import run_distributed, shutdown_pools

    rows, lines = {}, [f"{'case':16} {'hecate ms':>9} {'ds ms':>8} {'h/ds':>5} {'hecate MB':>9} {'ds MB':>7} {'h/ds':>5}"]
    for k in (1, 2):
        for skew in (False, True):
            case = f"top{k}_{'skewed' if skew else 'uniform'}"
            row = {"hecate": summarize(run_distributed(bench_layer, args.nproc, a, "hecate", k, skew,
                                                       args.warmup, args.iters, timeout=args.timeout))}
            if not missing:
                row["deepspeed"] = summarize(run_distributed(bench_layer, args.nproc, a, "deepspeed", k, skew,
                                                             args.warmup, args.iters, timeout=args.timeout))
                row["time_ratio_hecate_over_ds"] = row["hecate"]["time_s"] / row["deepspeed"]["time_s"]
                row["peak_ratio_hecate_over_ds"] = (row["hecate"]["peak_bytes_per_rank"]
                                                    / row["deepspeed"]["peak_bytes_per_rank"])
            rows[case] = row
            h, d = row["hecate"], row.get("deepspeed")
            nan = float("nan")
            lines.append(f"{case:16} {h['time_s'] * 1e3:9.1f} {(d['time_s'] * 1e3 if d else nan):8.1f} "
                         f"{row.get('time_ratio_hecate_over_ds', nan):5.2f} "
                         f"{h['peak_bytes_per_rank'] / 2**20:9.2f} "
                         f"{(d['peak_bytes_per_rank'] / 2**20 if d else nan):7.2f} "
                         f"{row.get('peak_ratio_hecate_over_ds', nan):5.2f}")
    shutdown_pools()
    result = {"config": a, "nproc": args.nproc, "deepspeed": None if missing else "available",
              "deepspeed_missing_reason": missing, "cases": rows}
    emit(result, args.json, "\n".join(lines))


if __name__ == "__main__":
    main()
