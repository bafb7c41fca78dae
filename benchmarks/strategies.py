"""dp vs ep vs fsdp vs fssdp on one small MoE transformer: bytes, lower bound, step time, memory.

    .venv/bin/python benchmarks/strategies.py [--config tiny|compute] [--strategies ep fssdp ...]
        [--routing uniform|skewed|both] [--paired] [--nproc 2] [--mem-nprocs 4 8] [--repeats 3]
        [--json] [--activation-checkpointing] [--malloc mmap|default]

    # ep vs fssdp side by side, steps alternating in the same processes (what docs/results.md uses):
    .venv/bin/python benchmarks/strategies.py --strategies ep fssdp --paired --repeats 3 --mem-nprocs

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
  median over the measured steps; ratio = strategy / ep (< 1 is faster than ep); with
  --paired the cases share processes and their steps alternate, so load from other jobs
  hits them alike, and each repeat's own ratio is shown (t/ep per repeat);
* cpu: process CPU time of the busier rank per step (its work and gloo's threads; a gloo
  wait sleeps for the most part but also spins some), median: on a machine shared with other
  jobs a steadier measure of the work a strategy does than wall time, though not free of load;
* memory: state = params + AdamW state (exact tensor bytes); step peak = VmHWM - VmRSS
  over a step (see benchmarks/_common.py); peak = state + step peak, max over ranks; measured
  under --malloc mmap (the default), which maps every tensor above 64 KiB afresh (a page fault
  per fresh page, in every case alike); --malloc default times steps under glibc's allocator
  as a training job runs it, and reports no peaks;
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
    # fssdp's defaults: the byte fit also charges each collective the replicas add (spAG, spRS,
    # re-gather) the backend's default latency (FssdpOptions.collective_latency_s = None):
    # replicas that do not repay it are dropped and the layer takes ep's path (docs/fssdp.md).
    # The time and memory targets are read off this row.
    ("fssdp", "fssdp", {"rematerialize": True}),
    # The byte-fitted plan (collective_latency_s = 0: any byte saving pays): its traffic tracks
    # the lower bound, so the byte targets are read off this row; fssdp_no_rm is its twin
    # without re-materialization.
    ("fssdp_bytes", "fssdp", {"rematerialize": True, "collective_latency_s": 0.0}),
    ("fssdp_no_rm", "fssdp", {"rematerialize": False, "collective_latency_s": 0.0}),
    # fssdp's defaults with the dense optimizer replicated as under ep (one all-reduce instead of
    # ZeRO-1's reduce-scatter + all-gather): separates the MoE layers' cost from the dense sync's.
    ("fssdp_dense_repl", "fssdp", {"rematerialize": True, "dense_optimizer": "replicated"}),
    # fssdp's defaults with the counts all-gather overlapped with the next layer's planning even
    # on gloo (overlap_counts, on by default only on a device backend).
    ("fssdp_overlap", "fssdp", {"rematerialize": True, "overlap_counts": True}),
]
OPT_IN = ("fssdp_dense_repl", "fssdp_overlap")  # run only when --strategies names them
DEFAULT_CASES = [c for c in CASES if c[0] not in OPT_IN]


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


def _build_case(rank, world, a, name, options, skew):
    """One strategy's model, engine and figures on this rank (built from seed 0 every time)."""
    import copy

    import torch

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
    topo = Topology()
    options = dict(options)
    dense_optimizer = options.pop("dense_optimizer", "auto")  # an Engine option, not the strategy's
    strat = build_strategy(name, topo, **options)
    model = parallelize(copy.deepcopy(base), strat)
    del base
    engine = Engine(model, strat, topo, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0,
                    dense_optimizer=dense_optimizer)
    out = {"times": [], "cpu": [], "bytes": [], "counts": [], "owned": [], "step_peak": [],
           "chunk_bytes": layout.chunk_numel * 4}
    return {"name": name, "model": model, "engine": engine, "topo": topo, "layers": moe_layers(model),
            "out": out}


def _run_step(case, rank, world, a, step, measured):
    """One training step of a built case between two barriers; its figures if `measured`."""
    import torch
    import torch.distributed as dist

    model, engine, topo = case["model"], case["engine"], case["topo"]
    g = torch.Generator().manual_seed(7919 * step + rank)
    tokens = torch.randint(0, a["vocab"], (a["batch"], a["seq"] + 1), generator=g)
    owned = _owned_fraction_LE(case["name"], case["layers"], world, rank, a["experts"])  # this step's
    topo.stats.reset()
    before = rss_bytes()
    reset_peak()
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    loss, res = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    engine.step()
    dist.barrier()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if measured:
        out = case["out"]
        out["times"].append(elapsed)
        out["cpu"].append(cpu)
        out["bytes"].append(topo.stats.snapshot())
        out["counts"].append(torch.stack([s.tokens_per_expert_E for s in res.moe_stats]).tolist())
        out["owned"].append(owned.tolist())
        out["step_peak"].append(peak_bytes() - before)


def _finish(case):
    import torch

    model, opt, out = case["model"], case["engine"].optimizer, case["out"]
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    out["state_bytes"] = state
    return out


def bench_case(rank, world, a, label, name, options, skew, warmup, steps):
    """One strategy on `world` ranks; returns this rank's raw figures."""
    case = _build_case(rank, world, a, name, options, skew)
    for step in range(warmup + steps):
        _run_step(case, rank, world, a, step, step >= warmup)
    return _finish(case)


def bench_paired(rank, world, a, cases, skew, warmup, steps):
    """Every case of `cases` ([(label, name, options)]) built in the same processes; their
    steps alternate (step i of each case, the order rotated by one each step), so load from
    other jobs hits every case alike. Returns {label: this rank's raw figures}."""
    built = [(label, _build_case(rank, world, a, name, options, skew)) for label, name, options in cases]
    for step in range(warmup + steps):
        k = step % len(built)
        for label, case in built[k:] + built[:k]:
            _run_step(case, rank, world, a, step, step >= warmup)
    return {label: _finish(case) for label, case in built}


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
    per_cpu = [max(r["cpu"][i] for r in res) for res in runs for i in range(steps)]
    return {
        "step_time_s": median(per_step),
        # CPU seconds of the busier rank (process time: its own work and gloo's threads, not
        # waits); less sensitive than wall time to other jobs on a shared machine.
        "step_cpu_s": median(per_cpu),
        "step_time_runs_s": [median(t) for t in per_run],
        "step_times_runs_s": per_run,  # [repeat][step]: the slowest rank's time of each step
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


def run(world, a, skews, warmup, steps, timeout, repeats=1, compare_checkpointing=False, cases=None,
        paired=False):
    """The selected `cases` (default: DEFAULT_CASES) under each routing; with repeats > 1
    they run in turn, `repeats` times over, so slow drift of the machine hits every strategy
    alike. `paired`: the cases of one repeat share processes and alternate step by step
    (bench_paired), which also cancels faster load changes."""
    from hecate.testing import run_distributed

    cases = DEFAULT_CASES if cases is None else cases
    table = {}
    for skew in skews:
        key = "skewed" if skew else "uniform"
        runs = {label: [] for label, _, _ in cases}
        ckpt = {label: [] for label, _, _ in cases}
        a_ckpt = {**a, "activation_checkpointing": True}
        for _ in range(repeats):
            if paired:
                for label, raw in _by_label(run_distributed(bench_paired, world, a, cases, skew, warmup, steps,
                                                            timeout=timeout)).items():
                    runs[label].append(raw)
                if compare_checkpointing:
                    for label, raw in _by_label(run_distributed(bench_paired, world, a_ckpt, cases, skew,
                                                                warmup, steps, timeout=timeout)).items():
                        ckpt[label].append(raw)
                continue
            for label, name, options in cases:
                runs[label].append(run_distributed(bench_case, world, a, label, name, options, skew, warmup,
                                                   steps, timeout=timeout))
                if compare_checkpointing:  # side by side: right after the same case without it
                    ckpt[label].append(run_distributed(bench_case, world, a_ckpt, label, name, options, skew,
                                                       warmup, steps, timeout=timeout))
        table[key] = {label: summarize(runs[label], a, label, name, options) for label, name, options in cases}
        if compare_checkpointing:
            for label, name, options in cases:
                row, on = table[key][label], summarize(ckpt[label], a_ckpt, label, name, options)
                row["checkpointed"] = {k: on[k] for k in ("peak_bytes_per_rank", "step_peak_bytes_per_rank",
                                                          "step_time_s", "expert_bytes")}
                row["ckpt_peak_vs_off"] = on["peak_bytes_per_rank"] / row["peak_bytes_per_rank"]
                off_step = row["step_peak_bytes_per_rank"]  # 0 when a tiny step fits in freed pages
                row["ckpt_step_peak_vs_off"] = on["step_peak_bytes_per_rank"] / off_step if off_step else None
                row["ckpt_time_vs_off"] = on["step_time_s"] / row["step_time_s"]
        rows = table[key]
        ep, fsdp = rows.get("ep"), rows.get("fsdp")  # the baselines, when they were selected
        for row in rows.values():
            row["time_vs_ep"] = row["step_time_s"] / ep["step_time_s"] if ep else None
            row["cpu_vs_ep"] = row["step_cpu_s"] / ep["step_cpu_s"] if ep else None
            row["peak_vs_ep"] = row["peak_bytes_per_rank"] / ep["peak_bytes_per_rank"] if ep else None
            row["bytes_vs_fsdp"] = row["expert_bytes"] / fsdp["expert_bytes"] if fsdp and fsdp["expert_bytes"] else None
            if ep:
                # Per repeat (paired: the same processes, steps alternating), and bytes against ep's.
                row["time_vs_ep_runs"] = [t / e for t, e in zip(row["step_time_runs_s"], ep["step_time_runs_s"])]
                row["time_vs_ep_paired"] = paired_ratio(row["step_times_runs_s"], ep["step_times_runs_s"]) \
                    if paired else None
                row["expert_bytes_vs_ep"] = row["expert_bytes"] / ep["expert_bytes"] if ep["expert_bytes"] else None
    return table


def paired_ratio(case_runs, base_runs, resamples: int = 2000, seed: int = 0):
    """(median, 2.5th, 97.5th percentile) of a case's step time over the baseline's, from
    paired steps: step i of a repeat ran right after or before the baseline's step i in the same
    processes (--paired), so their ratio cancels most of the machine's drift. The interval
    resamples whole repeats (a repeat's steps share one pair of processes and its load, so they
    are not independent) and takes the median ratio of each resample; a 3% difference is only
    decided when the interval lies on one side of 1.03. None with fewer than 2 repeats."""
    import numpy as np

    ratios = [np.asarray(c) / np.asarray(b) for c, b in zip(case_runs, base_runs)]
    if len(ratios) < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ratios), size=(resamples, len(ratios)))
    meds = [np.median(np.concatenate([ratios[i] for i in pick])) for pick in picks]
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(np.median(np.concatenate(ratios))), float(lo), float(hi)


def _by_label(ranks_out):
    """[rank]{label: raw} -> {label: [rank] raw}."""
    return {label: [r[label] for r in ranks_out] for label in ranks_out[0]}


def targets(table):
    """The issue's targets: read off the skewed-routing figures (those whose rows were run),
    and fssdp / ep under uniform routing (balanced: the goal is parity, within 3%). The byte
    targets come from the byte-fitted row (fssdp_bytes), time and memory from fssdp's defaults
    (fssdp: replicas only where they also repay their collectives)."""
    out = {}
    s, u = table.get("skewed", {}), table.get("uniform", {})
    b = s.get("fssdp_bytes")
    if b is not None:
        out.update({"fssdp_bytes_over_lower_bound": b["bytes_over_lower_bound"], "goal_bytes_over_lower_bound": 1.1})
        if b["bytes_vs_fsdp"] is not None:
            out.update({"fssdp_bytes_vs_fsdp": b["bytes_vs_fsdp"], "goal_bytes_vs_fsdp": 0.25})
    f = s.get("fssdp")
    if f is not None:
        if f["time_vs_ep"] is not None:
            out.update({
                "ep_time_over_fssdp": 1.0 / f["time_vs_ep"], "goal_ep_time_over_fssdp": 1.3,
                "ep_time_over_fssdp_runs": [1.0 / r for r in f["time_vs_ep_runs"]],
                "fssdp_rm_peak_vs_ep": f["peak_vs_ep"], "goal_peak_vs_ep": 1.15,
            })
    if u.get("fssdp") is not None and u["fssdp"]["time_vs_ep"] is not None:
        out.update({"uniform_fssdp_time_over_ep": u["fssdp"]["time_vs_ep"], "goal_uniform_fssdp_time_over_ep": 1.03,
                    "uniform_fssdp_time_over_ep_runs": u["fssdp"]["time_vs_ep_runs"],
                    "uniform_fssdp_time_over_ep_paired": u["fssdp"].get("time_vs_ep_paired")})
    return out


def _num(x, fmt):
    return format(float("nan") if x is None else x, fmt)


def _mib(n):
    return None if n is None else n / 2**20


def format_table(world, table, timed):
    lines = [f"== world {world} ({'timed' if timed else 'bytes and memory only'}) =="]
    head = f"{'routing':8} {'strategy':12} {'expert MB':>9} {'LB MB':>7} {'/LB':>6} {'/fsdp':>6} " \
           f"{'peak MB':>8} {'/ep':>5} {'imb':>5}" + (f" {'step ms':>8} {'t/ep':>5} {'cpu ms':>7}" if timed else "")
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
                    f"{_num(r['bytes_over_lower_bound'], '6.2f')} "
                    f"{_num(r['bytes_vs_fsdp'], '6.2f')} {_num(_mib(r['peak_bytes_per_rank']), '8.2f')} "
                    f"{_num(r['peak_vs_ep'], '5.2f')} {r['imbalance']:5.2f}")
            if timed:
                line += f" {r['step_time_s'] * 1e3:8.1f} {_num(r['time_vs_ep'], '5.2f')} {r['step_cpu_s'] * 1e3:7.1f}"
            if ckpt:
                c = r["checkpointed"]
                line += (f" | {c['peak_bytes_per_rank'] / 2**20:9.2f} {r['ckpt_peak_vs_off']:5.2f} "
                         f"{r['step_peak_bytes_per_rank'] / 2**20:10.2f} {c['step_peak_bytes_per_rank'] / 2**20:7.2f} "
                         f"{(r['ckpt_step_peak_vs_off'] or float('nan')):5.2f}")
                if timed:
                    line += f" {r['ckpt_time_vs_off']:10.2f}"
            if timed and len(r["step_time_runs_s"]) > 1:
                line += "  runs " + "/".join(f"{t * 1e3:.0f}" for t in r["step_time_runs_s"])
                if r.get("time_vs_ep_runs") and label != "ep":
                    line += " (t/ep " + "/".join(f"{x:.2f}" for x in r["time_vs_ep_runs"]) + ")"
                if r.get("time_vs_ep_paired") and label != "ep":
                    m, lo, hi = r["time_vs_ep_paired"]
                    line += f" paired t/ep {m:.3f} [95% {lo:.3f}-{hi:.3f}]"
            lines.append(line)
        for label, r in rows.items():  # collectives by name, so the bytes can be compared side by side
            lines.append(f"  {key} {label} bytes: " + ", ".join(
                f"{n} {v / 1e6:.3f}" for n, v in sorted(r["bytes_by_collective"].items()) if not n.startswith("dense.")))
    return "\n".join(lines)


# --config presets: the defaults of the size flags (any flag given explicitly wins).
CONFIGS = {
    "tiny": {},  # the argparse defaults below: d_model 64, 64 KiB chunks, latency-bound on gloo
    "compute": {"d_model": 256, "ffn": 1024, "batch": 64, "skew_scale": 0.1, "mem_nprocs": []},  # 2 MiB chunks
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny",
                    help="model preset: tiny (default sizes) or compute (d_model 256, ffn 1024, batch 64, "
                         "skew 0.1, no extra worlds); explicit size flags override it")
    ap.add_argument("--strategies", nargs="+", choices=[label for label, _, _ in CASES], default=None,
                    help="cases to run (default: all but the opt-in fssdp_dense_repl and fssdp_overlap); ratios need ep "
                         "(time, peak) and fsdp (bytes)")
    ap.add_argument("--routing", choices=("uniform", "skewed", "both"), default="both")
    ap.add_argument("--paired", action="store_true",
                    help="run the selected cases in the same processes, alternating step by step "
                         "(the order rotates each step), so machine load hits them alike")
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
    ap.add_argument("--malloc", choices=("mmap", "default"), default="mmap",
                    help="mmap (default): every tensor above 64 KiB mapped on its own, so step peaks are "
                         "measured, at the price of a page fault per fresh page in every step; default: "
                         "glibc's allocator as a training job runs it, for step times (peaks not measured)")
    preset = CONFIGS[ap.parse_known_args()[0].config]
    ap.set_defaults(**preset)
    args = ap.parse_args()
    if args.activation_checkpointing and args.malloc != "mmap":
        ap.error("--activation-checkpointing compares step peaks, which only --malloc mmap measures")
    prepare_spawn_env(mmap=args.malloc == "mmap")
    a = {"layers": args.layers, "experts": args.experts, "top_k": args.top_k, "d_model": args.d_model,
         "ffn": args.ffn, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
         "skew_scale": args.skew_scale, "threads": args.threads}
    cases = DEFAULT_CASES if args.strategies is None else [c for c in CASES if c[0] in args.strategies]
    skews = {"uniform": (False,), "skewed": (True,), "both": (False, True)}[args.routing]
    result = {"config": a, "preset": args.config, "cores": os.cpu_count(), "paired": args.paired,
              "malloc": args.malloc, "load_average": os.getloadavg(), "worlds": {}}
    texts = []
    for i, world in enumerate([args.nproc] + [w for w in args.mem_nprocs if w != args.nproc]):
        table = run(world, a, skews, args.warmup, args.steps, args.timeout,
                    args.repeats if i == 0 else 1, args.activation_checkpointing, cases, args.paired)
        if args.malloc != "mmap":  # freed memory stays in malloc's arenas: no step peak to read
            for row in (r for by_label in table.values() for r in by_label.values()):
                for k in ("step_peak_bytes_per_rank", "peak_bytes_per_rank", "peak_vs_ep"):
                    row[k] = None
        result["worlds"][str(world)] = {"timed": i == 0, "routing": table, "targets": targets(table)}
        texts.append(format_table(world, table, i == 0))
    result["load_average_after"] = os.getloadavg()
    from hecate.testing import shutdown_pools

    shutdown_pools()
    texts.append("load average before / after: " + " ".join(f"{x:.1f}" for x in result["load_average"]) +
                 " / " + " ".join(f"{x:.1f}" for x in result["load_average_after"]))
    emit(result, args.json, "\n\n".join(texts))


if __name__ == "__main__":
    main()
