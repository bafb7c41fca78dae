"""torch._grouped_mm vs a loop of per-expert matmuls inside hecate.moe.grouped_mlp.

Prints a table of forward+backward times per (device, dtype, shape) and the ratio
loop / grouped_mm (> 1: grouped_mm is faster); the last line is the same data as JSON
when --json is given. Used to fill hecate.moe.experts.PREFERRED_IMPL.
"""
from __future__ import annotations

import argparse
import json
import time

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from hecate.moe.experts import grouped_mlp  # noqa: E402


def _bench(fn, iters: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def run_case(device, dtype, tokens, experts, hidden, ffn, activation, iters, seed=0):
    g = torch.Generator().manual_seed(seed)
    # skewed, some empty experts: a realistic routed load
    weights = torch.rand(experts, generator=g) ** 3
    weights[0] = 0.0
    counts = torch.distributions.Multinomial(tokens, probs=weights / weights.sum()).sample().long()
    x = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    w1 = torch.randn(experts, ffn, hidden, dtype=dtype, device=device, requires_grad=True)
    w2 = torch.randn(experts, hidden, ffn, dtype=dtype, device=device, requires_grad=True)
    w3 = torch.randn(experts, ffn, hidden, dtype=dtype, device=device,
                     requires_grad=True) if activation == "swiglu" else None
    counts = counts.to(device)
    grad = torch.randn(tokens, hidden, dtype=dtype, device=device)
    row = {"device": device, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
           "experts": experts, "hidden": hidden, "ffn": ffn, "activation": activation}
    for impl in ("loop", "grouped_mm"):
        def step():
            y = grouped_mlp(x, counts, w1, w2, w3, activation, impl=impl)
            y.backward(grad)
        try:
            row[impl + "_ms"] = 1e3 * _bench(step, iters)
        except RuntimeError as err:  # unsupported dtype/device/alignment in this build
            row[impl + "_ms"] = None
            row[impl + "_error"] = str(err).splitlines()[0][:80]
    if row["loop_ms"] and row.get("grouped_mm_ms"):
        row["loop_over_grouped"] = row["loop_ms"] / row["grouped_mm_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [(512, 8, 128, 256)] if args.quick else [(512, 8, 128, 256), (2048, 16, 256, 512),
                                                      (4096, 64, 256, 512)]
    if "cuda" in devices and not args.quick:
        shapes.append((16384, 64, 1024, 2048))
    rows = []
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            for shape in shapes:
                if device == "cpu" and shape[0] > 4096:
                    continue
                for activation in ("gelu", "swiglu"):
                    rows.append(run_case(device, dtype, *shape, activation, args.iters))
    hdr = f"{'device':6} {'dtype':8} {'T':>6} {'E':>4} {'D':>5} {'F':>5} {'act':6} {'loop ms':>9} {'grouped ms':>10} {'loop/grouped':>12}"
    print(hdr)
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "n/a"
        print(f"{r['device']:6} {r['dtype']:8} {r['tokens']:>6} {r['experts']:>4} {r['hidden']:>5} "
              f"{r['ffn']:>5} {r['activation']:6} {fmt(r['loop_ms']):>9} {fmt(r.get('grouped_mm_ms')):>10} "
              f"{fmt(r.get('loop_over_grouped')):>12}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
