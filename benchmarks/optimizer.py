"""AdamW implementations side by side (optim.impl): fused vs foreach vs single-tensor.

    .venv/bin/python benchmarks/optimizer.py [--threads 1] [--steps 10] [--json]

The parameters are shaped like one rank's share of a MoE model under fssdp: a few
large expert chunk rows ([chunks, S]) and many small dense tensors. Each implementation
steps identical parameters with identical gradients; the script reports ms per step,
the ratio to "single", and the largest difference of the results from "single".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, median  # noqa: E402


def params_and_grads(chunks: int, chunk_numel: int, dense: int, dense_numel: int, layers: int):
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = [(chunks, chunk_numel)] * layers + [(dense_numel,)] * dense
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    return params, grads


def measure(impl: str, a: dict) -> tuple[list[float], list]:
    import torch

    from hecate.train.engine import build_adamw

    data, grads = params_and_grads(a["chunks"], a["chunk_numel"], a["dense"], a["dense_numel"], a["layers"])
    params = [torch.nn.Parameter(d) for d in data]
    opt = build_adamw(params, impl, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    times = []
    for step in range(a["warmup"] + a["steps"]):
        for p, gr in zip(params, grads):
            p.grad = gr
        start = time.perf_counter()
        opt.step()
        if step >= a["warmup"]:
            times.append(time.perf_counter() - start)
    return times, [p.detach() for p in params]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=8, help="expert chunks owned per layer")
    ap.add_argument("--chunk-numel", type=int, default=524288, help="elements per chunk (d 256, ffn 1024)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dense", type=int, default=20, help="dense tensors")
    ap.add_argument("--dense-numel", type=int, default=65536)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    a = vars(args)
    results, ref = {}, None
    for impl in ("single", "foreach", "fused"):
        times, params = measure(impl, a)
        if ref is None:
            ref = params
        diff = max(float((p - q).abs().max()) for p, q in zip(params, ref))
        results[impl] = {"step_ms": median(times) * 1e3, "max_abs_diff_vs_single": diff}
    for r in results.values():
        r["time_vs_single"] = r["step_ms"] / results["single"]["step_ms"]
    numel = args.chunks * args.chunk_numel * args.layers + args.dense * args.dense_numel
    lines = [f"AdamW step over {numel / 1e6:.1f}M elements, {args.threads} thread(s):"]
    lines += [f"  {k:8} {r['step_ms']:8.2f} ms  x{r['time_vs_single']:.2f} of single  "
              f"max |diff| {r['max_abs_diff_vs_single']:.1e}" for k, r in results.items()]
    emit({"config": a, "elements": numel, "results": results}, args.json, "\n".join(lines))


if __name__ == "__main__":
    main()
