"""Sparse collectives vs dense ones, side by side: bytes moved and wall time.

Placement: every rank owns C/W chunks (round robin); a few hot chunks are wanted by
every rank, the rest only by their owners (the skew FSSDP exploits). For that
placement this prints, per configuration:

- bytes received over all ranks by spAG / spRS (CommStats), by a dense all-gather /
  all-reduce of the same buffers, and the lower bound (each rank receives only the
  chunks it needs and does not own);
- wall time (median over iterations of the slowest rank) of spAG and spRS (the
  autograd functions checkpoints and re-sharding use), of their replica-only
  asynchronous forms (what FSSDP training issues: start_replica_gather /
  start_replica_reduce, then wait), of the dense collectives, and of spAG with the
  placement agreement check switched on.

Usage: python benchmarks/collectives.py --nproc 4 [--json]
(--json prints one JSON object on the last line). No timed asserts: numbers only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `hecate` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

# name: (chunks per rank, chunk size in floats, hot chunks, iterations)
CONFIGS = {
    "large chunks": (4, 1 << 16, 2, 20),  # 256 KiB chunks: bandwidth-bound
    "small chunks": (16, 256, 4, 40),     # 1 KiB chunks: issue-overhead-bound
}


def skewed_placement(world_size: int, chunks_per_rank: int, hot: int):
    """owner_C round robin; holders_WC: hot chunks everywhere, the rest at their owner only."""
    C = world_size * chunks_per_rank
    owner_C = torch.arange(C) % world_size
    holders_WC = torch.zeros(world_size, C, dtype=torch.bool)
    holders_WC[owner_C, torch.arange(C)] = True
    holders_WC[:, :hot] = True
    return owner_C, holders_WC


def _time(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_task(rank: int, world_size: int, chunks_per_rank: int, S: int, hot: int, iters: int) -> dict:
    """Runs on every rank: per-iteration times and this rank's CommStats snapshot."""
    from hecate.comm import CommStats, plan_sparse, sparse_all_gather, sparse_reduce_scatter
    from hecate.comm.sparse import start_replica_gather, start_replica_reduce

    owner_C, holders_WC = skewed_placement(world_size, chunks_per_rank, hot)
    C = owner_C.numel()
    owned_OS = torch.randn(int((owner_C == rank).sum()), S)
    grads_MS = torch.randn(int(holders_WC[rank].sum()), S)
    full_CS = torch.empty(C, S)
    stats = CommStats()
    plan = plan_sparse(owner_C, holders_WC, rank)
    replicas_RS = torch.randn(sum(plan.recv_counts), S)
    owned_grads_OS = torch.zeros_like(owned_OS)

    from hecate.comm.all_to_all import all_gather_flat

    # Without the agreement check (one extra tiny collective); one row measures it on top.
    cases = {
        "spAG": lambda: sparse_all_gather(owned_OS, owner_C, holders_WC, stats=stats, check=False),
        "spRS": lambda: sparse_reduce_scatter(grads_MS, owner_C, holders_WC, stats=stats, check=False),
        "spAG + check": lambda: sparse_all_gather(owned_OS, owner_C, holders_WC, check=True),
        # The training path: planned once per layer, issued asynchronously, waited on later.
        "spAG replicas async": lambda: start_replica_gather(owned_OS, plan, None, async_op=True).wait(),
        "spRS replicas async": lambda: start_replica_reduce(replicas_RS, owned_grads_OS, plan, None,
                                                            async_op=True).wait(),
    }
    # Dense baselines over the same buffers (round robin: every rank owns C/W chunks).
    cases["dense all-gather"] = lambda: all_gather_flat(full_CS, owned_OS)
    cases["dense all-reduce"] = lambda: dist.all_reduce(full_CS)

    times = {}
    with torch.no_grad():
        for name, fn in cases.items():
            _time(fn, 2)  # warm-up (also fills `stats` with 2 calls of each sparse op)
            times[name] = _time(fn, iters)
    # Bytes of one call (every call of a name moves the same bytes).
    snap = {name: {k: v // max(counts["calls"], 1) if k != "calls" else v for k, v in counts.items()}
            for name, counts in stats.snapshot().items()}
    return {"times": times, "stats": snap}


def summarize(world_size: int, chunks_per_rank: int, S: int, hot: int, results: list[dict]) -> dict:
    owner_C, holders_WC = skewed_placement(world_size, chunks_per_rank, hot)
    C = owner_C.numel()
    chunk_bytes = S * 4
    needed_not_owned = sum(int((holders_WC[r] & (owner_C != r)).sum()) for r in range(world_size))
    lower_bound = needed_not_owned * chunk_bytes
    dense_ag = world_size * (C - chunks_per_rank) * chunk_bytes   # every rank receives all it lacks
    dense_ar = 2 * (world_size - 1) * C * chunk_bytes              # ring all-reduce, all ranks
    received = {name: sum(r["stats"][name]["received"] for r in results)
                for name in results[0]["stats"]}
    time_ms = {}
    for name in results[0]["times"]:
        per_iter_max = [max(r["times"][name][i] for r in results) for i in range(len(results[0]["times"][name]))]
        time_ms[name] = 1e3 * statistics.median(per_iter_max)
    return {
        "world_size": world_size, "chunks": C, "chunk_bytes": chunk_bytes, "hot_chunks": hot,
        "bytes": {
            "lower_bound": lower_bound,
            "spAG": received.get("spAG", 0),
            "spRS": received.get("spRS", 0),
            "dense_all_gather": dense_ag,
            "dense_all_reduce": dense_ar,
        },
        "time_ms": time_ms,
    }


def _table(name: str, summary: dict):
    from rich.table import Table

    b, t = summary["bytes"], summary["time_ms"]
    lb = max(b["lower_bound"], 1)
    table = Table(title=f"{name}: W={summary['world_size']}, C={summary['chunks']}, "
                        f"chunk={summary['chunk_bytes'] // 1024} KiB, hot={summary['hot_chunks']}")
    for col in ("collective", "MiB received (all ranks)", "x lower bound", "ms", "ms replicas async"):
        table.add_column(col, justify="right" if col != "collective" else "left")
    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    fmt = lambda key: f"{t[key]:.2f}" if key in t else "-"  # noqa: E731
    table.add_row("lower bound", mib(b["lower_bound"]), "1.00", "", "")
    table.add_row("spAG", mib(b["spAG"]), f"{b['spAG'] / lb:.2f}", fmt("spAG"), fmt("spAG replicas async"))
    table.add_row("spAG + agreement check", "", "", fmt("spAG + check"), "")
    table.add_row("dense all-gather", mib(b["dense_all_gather"]), f"{b['dense_all_gather'] / lb:.2f}",
                  fmt("dense all-gather"), "")
    table.add_row("spRS", mib(b["spRS"]), f"{b['spRS'] / lb:.2f}", fmt("spRS"), fmt("spRS replicas async"))
    table.add_row("dense all-reduce", mib(b["dense_all_reduce"]), f"{b['dense_all_reduce'] / lb:.2f}",
                  fmt("dense all-reduce"), "")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="world size (gloo processes on this host)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.nproc < 2:
        parser.error(f"--nproc must be >= 2, got {args.nproc}")

    from hecate.testing import run_distributed, shutdown_pools

    out = {}
    try:
        for name, (per_rank, S, hot, iters) in CONFIGS.items():
            results = run_distributed(bench_task, args.nproc, per_rank, S, hot, iters, timeout=300)
            out[name] = summarize(args.nproc, per_rank, S, hot, results)
    finally:
        shutdown_pools()
    try:
        from rich.console import Console

        console = Console()
        for name, summary in out.items():
            console.print(_table(name, summary))
    except ImportError:  # rich is a dependency, but numbers matter more than formatting
        print(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps({"benchmark": "collectives", "nproc": args.nproc, "configs": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
