"""TopKRouter's gating side by side: the fused kernel's outputs vs recomputing them in PyTorch.

Three ways to get (weights, indices, scores) and their gradient into the logits, for the
same logits, forward + backward of a loss on weights and scores (what the MoE layer does):

- fused:     hecate.ops.topk_gating (C++ / CUDA kernel) with its autograd: what TopKRouter uses;
- recompute: the kernel only for the indices, then softmax, gather and renormalization in
             PyTorch (what TopKRouter did before);
- torch:     plain PyTorch (softmax, stable sort, gather, renormalization).

Prints median milliseconds and the ratios recompute / fused and torch / fused (above 1:
the fused path is faster). Both sides use the same torch.set_num_threads value.
Usage: python benchmarks/router.py [--tokens 16384 --experts 64 --k 2 --repeats 20 --json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from hecate import ops  # noqa: E402


def fused(logits_TE, k, bias_E):
    return ops.topk_gating(logits_TE, k, "softmax", True, bias_E)


def recompute(logits_TE, k, bias_E):
    scores_TE = torch.softmax(logits_TE, dim=-1)
    with torch.no_grad():
        _, indices_TK, _ = ops.topk_gating(logits_TE.detach(), k, "softmax", False, bias_E)
    weights_TK = scores_TE.gather(1, indices_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights_TK, indices_TK, scores_TE


def plain(logits_TE, k, bias_E):
    scores_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = scores_TE.detach() + bias_E
    indices_TK = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :k]
    weights_TK = scores_TE.gather(1, indices_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights_TK, indices_TK, scores_TE


def step(fn, logits_TE, k, bias_E, g_w, g_s):
    leaf = logits_TE.detach().requires_grad_(True)
    weights_TK, _, scores_TE = fn(leaf, k, bias_E)
    ((weights_TK * g_w).sum() + (scores_TE * g_s).sum()).backward()
    if leaf.is_cuda:
        torch.cuda.synchronize()
    return leaf.grad


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    logits = torch.randn(args.tokens, args.experts, device=dev)
    bias = torch.randn(args.experts, device=dev) * 0.01
    g_w = torch.randn(args.tokens, args.k, device=dev)
    g_s = torch.randn(args.tokens, args.experts, device=dev)
    # The three agree (indices exactly, gradients to float precision) before they are timed.
    grads = [step(f, logits, args.k, bias, g_w, g_s) for f in (fused, recompute, plain)]
    for other in grads[1:]:
        torch.testing.assert_close(grads[0], other, rtol=1e-4, atol=1e-6)
    ms = {name: median_ms(lambda f=f: step(f, logits, args.k, bias, g_w, g_s), args.repeats)
          for name, f in (("fused", fused), ("recompute", recompute), ("torch", plain))}
    result = {"benchmark": "router", "device": str(dev), "threads": torch.get_num_threads(),
              "tokens": args.tokens, "experts": args.experts, "k": args.k, "ms": ms,
              "recompute_over_fused": ms["recompute"] / ms["fused"],
              "torch_over_fused": ms["torch"] / ms["fused"]}
    print(f"router gating fwd+bwd, {args.tokens} tokens x {args.experts} experts, top-{args.k}, "
          f"{dev}, {result['threads']} threads")
    for name, v in ms.items():
        print(f"  {name:10s} {v:8.3f} ms  ({v / ms['fused']:.2f}x fused)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
