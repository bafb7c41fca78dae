"""Helpers shared by the benchmarks: repo path, per-process peak memory, skewed routing, output.

Peak memory: the CPU allocator keeps no statistics, so a step's transient peak is read
from the kernel: writing "5" to /proc/self/clear_refs resets the high-water mark VmHWM
to the current RSS, and VmHWM after the step minus VmRSS before it is the extra
resident memory the step needed. MALLOC_MMAP_THRESHOLD_ (set before the ranks are
spawned) makes glibc map every tensor above 64 KiB on its own and unmap it when
freed, so freed tensors do not hide inside malloc's arenas between steps.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without install
    sys.path.insert(0, str(REPO))

MMAP_THRESHOLD = "65536"


def prepare_spawn_env(mmap: bool = True) -> None:
    """Call before the first rank is spawned (children read these at start-up). mmap=False
    leaves glibc's default allocator (what a training job runs with): step times without the
    page faults of mapping every large tensor afresh, but freed memory then stays in malloc's
    arenas, so step peaks are not measured."""
    if mmap:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def zipf_bias(num_experts: int, exponent: float = 1.2, scale: float = 1.0, seed: int = 0):
    """Per-expert selection bias log(p_e) * scale for a Zipf(exponent) p over experts in a
    fixed random order (so the hot experts are not all on rank 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    p = p / p.sum()
    return (scale * p.log()).float()[torch.randperm(num_experts, generator=g)]


def median(xs):
    xs = list(xs)
    return statistics.median(xs) if xs else None


def emit(result: dict, as_json: bool, table: str) -> None:
    """Print the table (human) and, with --json, one JSON object on the last line."""
    print(table, flush=True)
    if as_json:
        print(json.dumps(result, sort_keys=True), flush=True)
