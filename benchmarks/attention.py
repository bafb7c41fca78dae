"""hecate's attention kernels against F.scaled_dot_product_attention, side by side in one run.

    .venv/bin/python benchmarks/attention.py [--seqs 512,2048,8192] [--dims 64,128]
        [--heads 8 --kv-heads 2] [--window 1024] [--repeats 3] [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--json]

Every case is causal GQA (heads : kv-heads, 4:1 by default), batch 1, fp32 unless --dtype (on a
GPU, bf16 / fp16 let SDPA pick its flash backend), forward + backward
(a fixed random output gradient). Per (S, head_dim) it times, interleaved repeat by repeat:
  sdpa     F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) (torch's CPU flash kernel)
  flash    hecate.ops.flash_attention (dense causal)
  moh75 / moh50   hecate.ops.moh_attention with 75% / 50% of the heads chosen per token (random)
  window   flash_attention with a sliding window (only where S > window)
and reports medians, the forward attention-core FLOPs each runner needs (MoH: only its share of
the heads; window: only the visible keys), speed ratios (sdpa time / time, so > 1 is faster than SDPA) and peak memory
above the inputs. CPU peak memory is the high-water mark of bytes held by torch's allocator during
one forward + backward (torch.profiler memory events: the kernels allocate their scratch through
it), CUDA's is torch.cuda.max_memory_allocated. The machine may be shared: timings are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, median  # noqa: E402

TARGETS = {  # the bars of issue 12, at the longest sequence
    "flash_speed_vs_sdpa": 1.0, "flash_peak_vs_sdpa_max": 1.1, "moh75_speed_vs_sdpa": 1.25,
    "moh50_speed_vs_sdpa": 1.8, "window_speed_vs_flash": 3.0,
}


def make_runners(S, d, a, device):
    import torch
    import torch.nn.functional as F

    from hecate.ops import attention as attn

    g = torch.Generator().manual_seed(S + d)
    H, G = a.heads, a.kv_heads
    dtype = getattr(torch, a.dtype)
    q = torch.randn(1, H, S, d, generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(1, G, S, d, generator=g).to(device, dtype).requires_grad_(True)
    v = torch.randn(1, G, S, d, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(1, H, S, d, generator=g).to(device, dtype)

    def routing(share):
        n = max(1, round(H * share))
        idx = torch.rand(1, S, H, generator=g).argsort(-1)[..., :n].sort(-1).values.to(device)
        return idx, torch.ones(idx.shape, device=device)

    def step(out):
        out.backward(grad)
        for t in (q, k, v):
            t.grad = None

    runners = {
        "sdpa": lambda: step(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "flash": lambda: step(attn.flash_attention(q, k, v, causal=True)),
    }
    for label, share in (("moh75", 0.75), ("moh50", 0.5)):
        idx, w = routing(share)
        runners[label] = (lambda idx=idx, w=w: step(attn.moh_attention(q, k, v, idx, w, causal=True)))
    if S > a.window:
        runners["window"] = lambda: step(attn.flash_attention(q, k, v, causal=True, window=a.window))
    return runners


def attention_flops(S, d, a, name) -> int:
    """Forward FLOPs of the attention core (QK^T and PV over the visible query-key pairs) of one
    runner: MoH computes only its share of the (token, head) pairs, the window only W keys a row."""
    visible = S * (S + 1) // 2  # causal pairs per head
    if name == "window":
        W = a.window
        visible = sum(min(p + 1, W) for p in range(S))
    heads = a.heads * {"moh75": 0.75, "moh50": 0.5}.get(name, 1.0)
    return int(round(4 * d * visible * heads))


def peak_bytes(fn, device) -> int:
    """Most bytes torch's allocator held at once during fn(), beyond what was held before."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def measure(S, d, a) -> dict:
    import torch

    runners = make_runners(S, d, a, a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    times = {name: [] for name in runners}
    for name, fn in runners.items():  # warm-up (first-call allocations, thread pools)
        fn()
    for _ in range(a.repeats):
        for name, fn in runners.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    row = {name: {"time_s": median(ts), "peak_bytes": peak_bytes(runners[name], a.device),
                  "attention_flops_fwd": attention_flops(S, d, a, name)}
           for name, ts in times.items()}
    base_t, base_m = row["sdpa"]["time_s"], row["sdpa"]["peak_bytes"]
    for r in row.values():
        r["speed_vs_sdpa"] = base_t / r["time_s"]
        r["peak_vs_sdpa"] = r["peak_bytes"] / base_m if base_m else float("nan")
    if "window" in row:
        row["window"]["speed_vs_flash"] = row["flash"]["time_s"] / row["window"]["time_s"]
    return row


def check_targets(rows: dict, S: int) -> dict:
    out = {}
    for key, row in rows.items():
        if not key.startswith(f"S{S}_"):
            continue
        figures = {
            "flash_speed_vs_sdpa": row["flash"]["speed_vs_sdpa"],
            "flash_peak_vs_sdpa_max": row["flash"]["peak_vs_sdpa"],
            "moh75_speed_vs_sdpa": row["moh75"]["speed_vs_sdpa"],
            "moh50_speed_vs_sdpa": row["moh50"]["speed_vs_sdpa"],
        }
        if "window" in row:
            figures["window_speed_vs_flash"] = row["window"]["speed_vs_flash"]
        for name, value in figures.items():
            bar = TARGETS[name]
            met = value <= bar if name.endswith("_max") else value >= bar
            out[f"{key}:{name}"] = {"value": value, "target": bar, "met": met}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="512,2048,8192")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import torch

    import hecate.ops as ops

    if not ops.extension_available():
        raise SystemExit("hecate._C is not built: run `make build` (the benchmark compares the kernels)")
    if a.threads:
        torch.set_num_threads(a.threads)
    seqs = [int(s) for s in a.seqs.split(",")]
    dims = [int(x) for x in a.dims.split(",")]
    rows = {}
    for S in seqs:
        for d in dims:
            rows[f"S{S}_d{d}"] = measure(S, d, a)
            if not a.json:
                r = rows[f"S{S}_d{d}"]
                print(f"S={S:5d} d={d:3d}  " + "  ".join(
                    f"{n} {v['time_s'] * 1e3:8.1f} ms x{v['speed_vs_sdpa']:.2f} {v['peak_bytes'] / 2**20:6.1f} MiB"
                    for n, v in r.items()), flush=True)
    result = {"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(), "heads": a.heads,
              "kv_heads": a.kv_heads,
              "window": a.window, "repeats": a.repeats, "cases": rows, "targets": check_targets(rows, max(seqs))}
    emit(result, a.json, "\n".join(f"{k}: {v['value']:.3f} (target {v['target']}) "
                                    f"{'met' if v['met'] else 'NOT met'}" for k, v in result["targets"].items()))
    return result


if __name__ == "__main__":
    main()
