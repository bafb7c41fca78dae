"""dp vs ep vs fsdp vs fssdp on one small MoE transformer: bytes, lower bound, step time, memory.

    .venv/bin/python benchmarks/strategies.py [--nproc 2] [--mem-nprocs 4 8] [--repeats 3] [--json]
                                              [--activation-checkpointing]

Every strategy trains the same model (same seed) on the same batches, under uniform and
Zipf-skewed routing. Skew is deterministic: the router's aux-free selection bias
(MoEConfig.aux_free_bias, update rate 0, so it never moves) is set to
`skew_scale * log(p_e)` for a Zipf(1.2) p over the experts in a fixed shuffled order; it
changes which experts are chosen, never the gate weights. Per strategy and world size:

* bytes: bytes received per step, summed over ranks (= bytes sent), by collective name,
  from Topology.stats (reset before and read after each measured step);
* lower bound (expert traffic only, see docs/results.md): for every (rank r, expert e) pair
  where r routed n > 0 entries to e and does not own e's parameters under this strategy's
  placement, the cheaper of moving e's chunk (gather, and its gradient back: 2 passes,
  3 with re-materialization) or moving the n token rows (dispatch, combine, and both in
  backward: 4 passes); dp has no lower bound (it replicates by design);
* time: the step (forward, backward, Engine.step) between two barriers, slowest rank,
  median over the measured steps; ratio = strategy / ep (< 1 is faster than ep);
* memory: state = params + AdamW state (exact tensor bytes); step peak = VmHWM - VmRSS
  over a step (see benchmarks/_common.py); peak = state + step peak, max over ranks;
* --activation-checkpointing: every case runs a second time with model.activation_checkpointing
  on (same seed, same batches, right after the first); the table adds its peak and step peak
  and their ratio to the run without it (ckpt/off; < 1 is less memory), and its step time.
"""
from __future__ import annotations

import argparse
import os
import time

from _common import emit, median, peak_bytes, prepare_spawn_env, reset_peak, rss_bytes, zipf_bias

# (label, strategy name, options)
CASES = [
    ("dp", "dp", {}),
    ("ep", "ep", {}),
    ("fsdp", "fsdp", {}),
    ("fssdp", "fssdp", {"rematerialize": True}),
    ("fssdp_no_rm", "fssdp", {"rematerialize": False}),
]


def model_config(a):
    from hecate.models.transformer import TransformerConfig
    from hecate.moe.config import MoEConfig

    moe = MoEConfig(hidden_size=a["d_model"], ffn_hidden_size=a["ffn"], num_experts=a["experts"],
                    top_k=a["top_k"], aux_loss_coeff=0.01, aux_free_bias=True, bias_update_rate=0.0)
    return TransformerConfig(vocab_size=a["vocab"], d_model=a["d_model"], n_layers=a["layers"], n_heads=4,
                             max_seq_len=a["seq"], dense_ffn_hidden=a["ffn"], moe_every=1, moe=moe,
                             activation_checkpointing=a.get("activation_checkpointing", False))


def _owned_fraction_LE(name, layers, world, rank, E):
    """Fraction of each expert's parameters that `rank` keeps under this strategy ([L, E])."""
    import torch

    rows = []
    for layer in layers:
        if name == "dp":
            rows.append(torch.ones(E))
        elif name == "ep":
            first, local = layer.expert_slice
            f = torch.zeros(E)
            f[first:first + local] = 1
            rows.append(f)
        elif name == "fsdp":
            rows.append(torch.full((E,), 1.0 / world))
        else:
            rows.append((layer.fssdp_state.owner_E == rank).float())
    return torch.stack(rows)


def bench_case(rank, world, a, label, name, options, skew, warmup, steps):
    """One strategy on `world` ranks; returns this rank's raw figures."""
    import copy

    import torch
    import torch.distributed as dist

    from hecate.comm.topology import Topology
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import build_strategy, moe_layers, parallelize
    from hecate.parallel.chunks import ChunkLayout
    from hecate.train.engine import Engine

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    base = MoETransformer(model_config(a))
    bias_E = zipf_bias(a["experts"], scale=a["skew_scale"]) if skew else torch.zeros(a["experts"])
    for layer in moe_layers(base):
        layer.router.expert_bias_E.copy_(bias_E)
    layout = ChunkLayout.of(moe_layers(base)[0].experts)
    chunk_bytes = layout.chunk_numel * 4
    topo = Topology()
    strat = build_strategy(name, topo, **options)
    model = parallelize(copy.deepcopy(base), strat)
    del base
    engine = Engine(model, strat, topo, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    layers = moe_layers(model)
    out = {"times": [], "bytes": [], "counts": [], "owned": [], "step_peak": [], "chunk_bytes": chunk_bytes}
    for step in range(warmup + steps):
        g = torch.Generator().manual_seed(7919 * step + rank)
        tokens = torch.randint(0, a["vocab"], (a["batch"], a["seq"] + 1), generator=g)
        owned = _owned_fraction_LE(name, layers, world, rank, a["experts"])  # placement this step used
        topo.stats.reset()
        before = rss_bytes()
        reset_peak()
        dist.barrier()
        start = time.perf_counter()
        loss, res = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        engine.step()
        dist.barrier()
        elapsed = time.perf_counter() - start
        if step >= warmup:
            out["times"].append(elapsed)
            out["bytes"].append(topo.stats.snapshot())
            out["counts"].append(torch.stack([s.tokens_per_expert_E for s in res.moe_stats]).tolist())
            out["owned"].append(owned.tolist())
            out["step_peak"].append(peak_bytes() - before)
    opt = engine.optimizer
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    out["state_bytes"] = state
    return out


def lower_bound(ranks_out, step, a, rematerialize):
    """Expert-traffic lower bound for one step (bytes received, summed over ranks)."""
    import torch

    chunk = ranks_out[0]["chunk_bytes"]
    row = a["d_model"] * 4
    passes = 3 if rematerialize else 2
    total = 0.0
    for r in ranks_out:
        counts = torch.tensor(r["counts"][step], dtype=torch.float64)   # [L, E]
        missing = 1.0 - torch.tensor(r["owned"][step], dtype=torch.float64)
        move_chunk = passes * chunk * missing
        move_tokens = 4 * row * counts
        need = (counts > 0) & (missing > 0)
        total += float(torch.where(need, torch.minimum(move_chunk, move_tokens * (missing > 0)), 0.0).sum())
    return total


def summarize(runs, a, label, name, options):
    """Per-case figures from the per-rank raw results of each repeat (`runs[repeat][rank]`).

    Time: per step the slowest rank; the median over the steps of every repeat, and each
    repeat's own median (their spread shows the machine's noise). Bytes and memory are
    deterministic and read from the first repeat.
    """
    from hecate.comm.stats import CommStats

    results = runs[0]
    steps = len(results[0]["times"])
    per_run = [[max(r["times"][i] for r in res) for i in range(steps)] for res in runs]
    per_step = [t for run_times in per_run for t in run_times]
    by_name = {}
    for i in range(steps):
        combined = CommStats.combine([r["bytes"][i] for r in results])
        for n, c in combined.items():
            by_name.setdefault(n, []).append(c["received"])
    by_name = {n: median(v) for n, v in by_name.items()}
    expert = sum(v for n, v in by_name.items() if not n.startswith("dense."))
    lb = None if name == "dp" else median(
        lower_bound(results, i, a, options.get("rematerialize", True) and name == "fssdp") for i in range(steps))
    if name == "fsdp":  # fsdp re-gathers nothing in backward: one gather + one reduce
        lb = median(lower_bound(results, i, a, False) for i in range(steps))
    counts = [sum(map(sum, zip(*r["counts"][0]))) for r in results]
    load_E = [sum(r["counts"][0][l][e] for r in results for l in range(a["layers"]))
              for e in range(a["experts"])]
    return {
        "step_time_s": median(per_step),
        "step_time_runs_s": [median(t) for t in per_run],
        "bytes_by_collective": by_name,
        "expert_bytes": expert,
        "dense_bytes": sum(v for n, v in by_name.items() if n.startswith("dense.")),
        "lower_bound_bytes": lb,
        "bytes_over_lower_bound": (expert / lb) if lb else None,
        "state_bytes_per_rank": max(r["state_bytes"] for r in results),
        "step_peak_bytes_per_rank": max(median(r["step_peak"]) for r in results),
        "peak_bytes_per_rank": max(r["state_bytes"] + median(r["step_peak"]) for r in results),
        "imbalance": max(load_E) / (sum(load_E) / len(load_E)),
        "routed_entries": sum(counts),
    }


def run(world, a, skews, warmup, steps, timeout, repeats=1, compare_checkpointing=False):
    """Every case under each routing; with repeats > 1 the cases run in turn, `repeats`
    times over, so slow drift of the machine hits every strategy alike."""
    from hecate.testing import run_distributed

    table = {}
    for skew in skews:
        key = "skewed" if skew else "uniform"
        runs = {label: [] for label, _, _ in CASES}
        ckpt = {label: [] for label, _, _ in CASES}
        a_ckpt = {**a, "activation_checkpointing": True}
        for _ in range(repeats):
            for label, name, options in CASES:
                runs[label].append(run_distributed(bench_case, world, a, label, name, options, skew, warmup,
                                                   steps, timeout=timeout))
                if compare_checkpointing:  # side by side: right after the same case without it
                    ckpt[label].append(run_distributed(bench_case, world, a_ckpt, label, name, options, skew,
                                                       warmup, steps, timeout=timeout))
        table[key] = {label: summarize(runs[label], a, label, name, options) for label, name, options in CASES}
        if compare_checkpointing:
            for label, name, options in CASES:
                row, on = table[key][label], summarize(ckpt[label], a_ckpt, label, name, options)
                row["checkpointed"] = {k: on[k] for k in ("peak_bytes_per_rank", "step_peak_bytes_per_rank",
                                                          "step_time_s", "expert_bytes")}
                row["ckpt_peak_vs_off"] = on["peak_bytes_per_rank"] / row["peak_bytes_per_rank"]
                off_step = row["step_peak_bytes_per_rank"]  # 0 when a tiny step fits in freed pages
                row["ckpt_step_peak_vs_off"] = on["step_peak_bytes_per_rank"] / off_step if off_step else None
                row["ckpt_time_vs_off"] = on["step_time_s"] / row["step_time_s"]
        ep_time = table[key]["ep"]["step_time_s"]
        ep_peak = table[key]["ep"]["peak_bytes_per_rank"]
        fsdp_bytes = table[key]["fsdp"]["expert_bytes"]
        for row in table[key].values():
            row["time_vs_ep"] = row["step_time_s"] / ep_time
            row["peak_vs_ep"] = row["peak_bytes_per_rank"] / ep_peak
            row["bytes_vs_fsdp"] = row["expert_bytes"] / fsdp_bytes if fsdp_bytes else None
    return table


def targets(table):
    """The issue's targets, read off the skewed-routing figures."""
    s = table["skewed"]
    f = s["fssdp"]
    return {
        "fssdp_bytes_over_lower_bound": f["bytes_over_lower_bound"], "goal_bytes_over_lower_bound": 1.1,
        "fssdp_bytes_vs_fsdp": f["bytes_vs_fsdp"], "goal_bytes_vs_fsdp": 0.25,
        "ep_time_over_fssdp": 1.0 / f["time_vs_ep"], "goal_ep_time_over_fssdp": 1.3,
        "ep_time_over_fssdp_runs": [e / t for e, t in zip(s["ep"]["step_time_runs_s"], f["step_time_runs_s"])],
        "fssdp_rm_peak_vs_ep": f["peak_vs_ep"], "goal_peak_vs_ep": 1.15,
    }


def format_table(world, table, timed):
    lines = [f"== world {world} ({'timed' if timed else 'bytes and memory only'}) =="]
    head = f"{'routing':8} {'strategy':12} {'expert MB':>9} {'LB MB':>7} {'/LB':>6} {'/fsdp':>6} " \
           f"{'peak MB':>8} {'/ep':>5} {'imb':>5}" + (f" {'step ms':>8} {'t/ep':>5}" if timed else "")
    ckpt = any("checkpointed" in r for rows in table.values() for r in rows.values())
    if ckpt:
        head += f" | {'ckpt peak':>9} {'/off':>5} {'step pk MB':>10} {'ckpt':>7} {'/off':>5}" + \
            (f" {'ckpt t/off':>10}" if timed else "")
    lines.append(head)
    for key, rows in table.items():
        for label, r in rows.items():
            lb = r["lower_bound_bytes"]
            line = (f"{key:8} {label:12} {r['expert_bytes'] / 1e6:9.3f} "
                    f"{(lb / 1e6 if lb is not None else float('nan')):7.3f} "
                    f"{(r['bytes_over_lower_bound'] or float('nan')):6.2f} "
                    f"{(r['bytes_vs_fsdp'] or float('nan')):6.2f} {r['peak_bytes_per_rank'] / 2**20:8.2f} "
                    f"{r['peak_vs_ep']:5.2f} {r['imbalance']:5.2f}")
            if timed:
                line += f" {r['step_time_s'] * 1e3:8.1f} {r['time_vs_ep']:5.2f}"
            if ckpt:
                c = r["checkpointed"]
                line += (f" | {c['peak_bytes_per_rank'] / 2**20:9.2f} {r['ckpt_peak_vs_off']:5.2f} "
                         f"{r['step_peak_bytes_per_rank'] / 2**20:10.2f} {c['step_peak_bytes_per_rank'] / 2**20:7.2f} "
                         f"{(r['ckpt_step_peak_vs_off'] or float('nan')):5.2f}")
                if timed:
                    line += f" {r['ckpt_time_vs_off']:10.2f}"
            if timed and len(r["step_time_runs_s"]) > 1:
                line += "  runs " + "/".join(f"{t * 1e3:.0f}" for t in r["step_time_runs_s"])
            lines.append(line)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks for the timed run (one per core)")
    ap.add_argument("--mem-nprocs", type=int, nargs="*", default=[4, 8],
                    help="extra world sizes measured for bytes and memory only")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--skew-scale", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (same for all)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed world: run every case this many times, in turn (medians over all)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="also run every case with model.activation_checkpointing on; report both peaks")
    args = ap.parse_args()
    prepare_spawn_env()
    a = {"layers": args.layers, "experts": args.experts, "top_k": args.top_k, "d_model": args.d_model,
         "ffn": args.ffn, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
         "skew_scale": args.skew_scale, "threads": args.threads}
    result = {"config": a, "cores": os.cpu_count(), "worlds": {}}
    texts = []
    for i, world in enumerate([args.nproc] + [w for w in args.mem_nprocs if w != args.nproc]):
        table = run(world, a, (False, True), args.warmup, args.steps, args.timeout,
                    args.repeats if i == 0 else 1, args.activation_checkpointing)
        result["worlds"][str(world)] = {"timed": i == 0, "routing": table, "targets": targets(table)}
        texts.append(format_table(world, table, i == 0))
    from hecate.testing import shutdown_pools

    shutdown_pools()
    emit(result, args.json, "\n\n".join(texts))


if __name__ == "__main__":
    main()
