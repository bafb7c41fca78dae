"""Expert modules in the DeepSpeed drop-in: the three ways Hecate computes them, side by side.

For a bias-free GELU MLP (the one form all three can run): GroupedExperts (built-in),
ModuleExperts grouped (fx graph, grouped Linear) and ModuleExperts generic (functional_call
per expert, forced). Forward+backward over a skewed routed load; prints times and the
ratios generic / grouped and grouped / built-in (> 1: the second is faster). A second row does
the same for a bare nn.Linear(D, D) expert with bias (grouped: one grouped GEMM over the stacked
weights plus the per-block bias; generic: functional_call per expert). Timings share the machine
with whatever else runs: compare the ratios of one run, not absolute numbers.

    .venv/bin/python benchmarks/module_experts.py --tokens 4096 --experts 16 --hidden 256 --ffn 512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from hecate.moe.experts import GroupedExperts  # noqa: E402
from hecate.moe.module_experts import ModuleExperts  # noqa: E402


def _time(fn, iters: int, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - start) / iters)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    load = torch.rand(a.experts) ** 3
    counts = torch.distributions.Multinomial(a.tokens, probs=load / load.sum()).sample().long()
    template = nn.Sequential(nn.Linear(a.hidden, a.ffn, bias=False), nn.GELU(), nn.Linear(a.ffn, a.hidden, bias=False))
    builtin = GroupedExperts(a.experts, a.hidden, a.ffn, "gelu")
    grouped = ModuleExperts(template, a.experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generic = ModuleExperts(template, a.experts)
    generic.__dict__["graph"] = None  # force the per-expert functional_call path
    generic.mode = "generic"
    with torch.no_grad():  # the same weights in all three
        for m in (grouped, generic):
            m.get_parameter("0__weight").copy_(builtin.w1_EFD)
            m.get_parameter("2__weight").copy_(builtin.w2_EDF)
    x = torch.randn(a.tokens, a.hidden, requires_grad=True)
    ys = [m(x, counts) for m in (builtin, grouped, generic)]
    assert all(torch.allclose(ys[0], y, atol=1e-5) for y in ys[1:]), "the three paths disagree"

    def step(m):
        return lambda: m(x, counts).sum().backward()

    linear_grouped, linear_generic = _bare_linear_pair(a.hidden, a.experts)
    assert torch.allclose(linear_grouped(x, counts), linear_generic(x, counts), atol=1e-5), "bare Linear paths disagree"
    t = {name: _time(step(m), a.iters, a.repeats)
         for name, m in (("builtin", builtin), ("grouped", grouped), ("generic", generic),
                         ("linear_grouped", linear_grouped), ("linear_generic", linear_generic))}
    res = {"shape": vars(a), "seconds": t, "generic_over_grouped": t["generic"] / t["grouped"],
           "grouped_over_builtin": t["grouped"] / t["builtin"],
           "bare_linear_generic_over_grouped": t["linear_generic"] / t["linear_grouped"]}
    print(f"fwd+bwd per call: built-in {t['builtin'] * 1e3:.2f} ms, ModuleExperts grouped "
          f"{t['grouped'] * 1e3:.2f} ms, generic {t['generic'] * 1e3:.2f} ms")
    print(f"generic / grouped = {res['generic_over_grouped']:.2f}x, grouped / built-in = "
          f"{res['grouped_over_builtin']:.2f}x")
    print(f"bare nn.Linear expert: grouped {t['linear_grouped'] * 1e3:.2f} ms, generic "
          f"{t['linear_generic'] * 1e3:.2f} ms, generic / grouped = {res['bare_linear_generic_over_grouped']:.2f}x")
    if a.json:
        print(json.dumps(res))
    return 0


def _bare_linear_pair(hidden: int, experts: int):
    """ModuleExperts of nn.Linear(hidden, hidden) with bias: grouped, and generic (forced), same weights."""
    grouped = ModuleExperts(nn.Linear(hidden, hidden), experts)
    assert grouped.mode == "grouped", "a bare nn.Linear expert should take the grouped path"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generic = ModuleExperts(nn.Linear(hidden, hidden), experts)
    generic.__dict__["graph"], generic.mode = None, "generic"
    with torch.no_grad():
        for n, p in grouped.named_parameters():
            p.copy_(torch.randn_like(p) / hidden ** 0.5)
            generic.get_parameter(n).copy_(p)
    return grouped, generic


if __name__ == "__main__":
    raise SystemExit(main())
