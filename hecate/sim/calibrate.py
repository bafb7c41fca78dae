"""`hecate simulate --calibrate`: measure this machine as a Hardware for the step model.

* gemm_flops: a [4096, 256] x [256, 1024] fp32 matmul on one torch thread (what each rank of
  the CPU benchmarks uses), median of repeats;
* adam_params_per_s: the runtime's fused AdamW (hecate.train.engine's default) on 4M fp32
  parameters;
* alpha, beta: 2 gloo ranks on this host (hecate.testing.run_distributed) time the runtime's
  all_to_all_v (Python wrapper included) with 64 B and 8 MiB per peer; alpha is the small one,
  beta = bytes / (large - small). Both ranks share a host, so intra- and inter-node links get the same
  figures, and ranks_per_node is 2 (the CPU benchmarks' layout).
Median over repeats; the machine is shared, so calibrate right before comparing.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from hecate.sim.hardware import CALIBRATION_FILE, Hardware


def _median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_rate() -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(4096, 256), torch.randn(256, 1024)
        return 2 * 4096 * 256 * 1024 / _median_time(lambda: a @ b)
    finally:
        torch.set_num_threads(threads)


def adam_rate() -> float:
    from hecate.train.engine import build_adamw

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = torch.nn.Parameter(torch.randn(1 << 22))
        p.grad = torch.randn_like(p)
        opt = build_adamw([p], "fused", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
        return p.numel() / _median_time(opt.step, repeats=5)
    finally:
        torch.set_num_threads(threads)


def _link_task(rank, world, sizes, repeats):
    """Median seconds of hecate's all_to_all_v (the runtime's token exchange, Python included)
    sending `n` bytes to every peer, for each n in `sizes`."""
    import torch.distributed as dist

    from hecate.comm.all_to_all import all_to_all_v

    out = {}
    for n in sizes:
        rows = max(n // 64, 1)
        x = torch.zeros(rows * world, 16)
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            t = time.perf_counter()
            all_to_all_v(x, [rows] * world, [rows] * world)
            if i:
                times.append(time.perf_counter() - t)
        out[n] = statistics.median(times)
    return out


def link_rates(small: int = 64, large: int = 8 << 20, repeats: int = 9) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of a 2-rank gloo all_to_all on this host."""
    from hecate.testing import run_distributed

    res = run_distributed(_link_task, 2, [small, large], repeats)
    t_small = max(r[small] for r in res)
    t_large = max(r[large] for r in res)
    return t_small, (large - small) / max(t_large - t_small, 1e-9)


def calibrate(path: str | Path | None = None) -> Hardware:
    alpha, beta = link_rates()
    hw = Hardware("calibrated", ranks_per_node=2, gemm_flops=gemm_rate(), adam_params_per_s=adam_rate(),
                  alpha_intra=alpha, bw_intra=beta, alpha_inter=alpha, bw_inter=beta, wire_bytes=4,
                  note=f"measured on this host at {time.strftime('%Y-%m-%d %H:%M:%S')}: 1 torch thread, "
                       "2 gloo ranks on loopback (intra = inter)")
    out = Path(path) if path else CALIBRATION_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(hw.to_json())
    tmp.replace(out)
    return hw
