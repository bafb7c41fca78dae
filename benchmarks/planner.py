"""How long the FSSDP per-step control plane takes, from 8 to 1024 ranks.

For every world size W, expert count E, top-k and routing (uniform or Zipf-skewed) it
times the whole plan of one MoE layer as the runtime computes it on each rank, the calls of
hecate/parallel/fssdp/strategy.py on its default path (the hecate policy, P1 placed by
Algorithm 1 inside the fused op, replicas fitted to bytes):

  plan():     predict  ->  planner.plan_layer(..., sparse=True) (one C++ op: the counts' check,
              totals and float64 history copy, P1 by Algorithm 1 in its proportional case, P1
              fitted to bytes, the token routes with this rank's layout, and this rank's spAG /
              spRS plan when P1 has replicas)  ->  history append + load update
  forward():  rank layout  ->  destination bins of its T x k routed entries (the C++ op)
              ->  device_plan on the spAG / spRS plan plan_layer made (when P1 has replicas)

(stages "plan", "bins", "sparse"); not the rest of forward (permute, expert slots, exchange),
nor the counts' all-gather, nor plan()'s own check of the fit's bound before the op
(materialize.fit_bound / fit_keeps_none: the C++ ops of csrc/cpu/fit_rule.h, one pass over the
counts; when they show that no replica can pay, plan() hands P0 to the op instead of
placing P1, which this benchmark does not do). `fused_ms` splits "plan" into the C++ op alone (`op`, its
dispatch included) and the Python around it (`wrap`: the result's RankLayout, TokenRoutes,
Plan and SparsePlan, the load update); `op_stages_us` times the op's stages as their own ops
(place_experts, fit_replicas, route_layout, sparse_plan) on the same inputs, each minus the
time of the same op on a 2-rank case (its dispatch), for reading where the op's time goes.

Side by side on the same inputs it times the staged path the fused one replaced (one call per
stage with the Python between them: load update + predict, P1, fit, routes, splits, bins,
sparse), with the time of each of its stages. Reported: milliseconds per layer (CPU time of
this process, so that other jobs on a shared machine do not inflate it: min and median of
--repeat runs), the ratio staged / fused, the peak of numpy / Python memory during one plan
(tracemalloc; torch's and the C++ ops' own allocations are not traced) plus the bytes of the
plan's [W, E] and [T, k] tensors (P1, the rank's receives, its bins: most of what the C++ ops
allocate), and for each series the growth exponent b of ms ~ W^b (least squares on log-log).
One thread (torch.set_num_threads(1)).

--reference also times the dense planner this one replaced (tests/fssdp_reference_planner.py:
[W, E, W] routes, a sort over ranks per copy in Algorithm 1, a loop over ranks in the byte
fit, a [T*k, W] comparison for the bins) on the same inputs, for W <= --reference-max-ranks
(it needs O(W^2 E) memory), and the ratio reference / new.

--policies prints the older table instead: all policies for --layers layers at one size.
No thresholds: the numbers are for reading, not asserting.

    .venv/bin/python benchmarks/planner.py [--ranks 8 64 256 1024] [--experts 64 256]
        [--top-k 2 8] [--routing uniform skewed] [--reference] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
from hecate.comm.sparse import plan_sparse  # noqa: E402
from hecate.parallel.fssdp import (  # noqa: E402
    CostModel,
    HecatePolicy,
    LoadPredictor,
    NoReplicationPolicy,
    ShadowingPolicy,
    build_plan,
    fit_holders,
    heterogeneous_sharding,
    node_of_ranks,
    proportional_quota,
    route_tokens,
)
from hecate.parallel.fssdp.planner import ReplicaFit, _op, history_buffer, plan_layer  # noqa: E402
from hecate.parallel.fssdp.sharding import even_sharding  # noqa: E402
from hecate.parallel.fssdp.strategy import FullyShardedSparse, device_plan  # noqa: E402

CPU = torch.device("cpu")

# A GPT-MoE-like expert (d=768, ffn 3072) in bf16; tokens of d=768 in bf16; RM on.
FIT = dict(chunk_bytes=2 * 768 * 3072 * 2, token_bytes=768 * 2, chunk_passes=3)


def zipf_counts(rng, W, E, tokens_per_rank, skew=1.2):
    p = 1.0 / np.arange(1, E + 1) ** skew
    p = rng.permutation(p / p.sum())
    return torch.from_numpy(np.stack([rng.multinomial(tokens_per_rank, p) for _ in range(W)]))


class Case:
    """One layer's inputs: counts of every rank, rank 0's routed indices, owners, nodes."""

    def __init__(self, W, E, k, routing, tokens, ranks_per_node, seed=0):
        if k > E:
            raise ValueError(f"--top-k {k} is more than --experts {E}: a token picks k distinct experts")
        rng = np.random.default_rng(seed)
        p = np.ones(E) if routing == "uniform" else 1.0 / np.arange(1, E + 1) ** 1.2
        p = rng.permutation(p / p.sum())
        self.W, self.E, self.k = W, E, k
        # Top-k picks k distinct experts per token; for counts the multinomial is close enough.
        self.counts = torch.from_numpy(rng.multinomial(tokens * k, p, size=W).astype(np.int64))
        self.indices = torch.from_numpy(
            np.stack([rng.choice(E, size=k, replace=False, p=p) for _ in range(tokens)]))
        self.counts_E = torch.bincount(self.indices.flatten(), minlength=E)
        self.counts[0] = self.counts_E  # rank 0's row is its real routing
        self.nodes = node_of_ranks(W, min(ranks_per_node, W))
        self.owner = (even_sharding(E, W) + 0) % W
        self.m = 2 * math.ceil(E / W)  # the runtime's default memory slots
        self.t = 4 * self.m  # t > m: the proportional case
        self.policy = HecatePolicy(overlap_degree=self.t)
        self.predictor = LoadPredictor(E)
        self.predictor.update_from_rank_counts(self.counts)
        self.history = torch.empty(W, E, dtype=torch.float64)  # op_args' history_out
        self.rank_history = deque([self.history], maxlen=1)  # history_buffer reuses the evicted entry


def plan_new(case: Case, stages: dict | None = None):
    """The runtime's whole plan of one layer, as rank 0 computes it (strategy.plan + forward's
    planning): the calls FullyShardedSparse makes, in its order."""
    clock = time.process_time
    t = clock()
    history = history_buffer(case.rank_history, case.counts)
    laid = plan_layer(case.counts, case.owner, case.nodes, 0, capacity_m=case.m, load_E=case.predictor.predict(),
                      overlap_degree=case.t, fit=ReplicaFit(**FIT), history_out=history, sparse=True)
    case.rank_history.append(history)
    case.predictor.update_checked(laid.counts_E)
    layout = laid.plan.rank_layout(0)
    if stages is not None:
        now = clock()
        stages["plan"] = stages.get("plan", 0.0) + now - t
        t = now
    bins = FullyShardedSparse._destination_bins(case.indices, case.E, layout)
    if stages is not None:
        now = clock()
        stages["bins"] = stages.get("bins", 0.0) + now - t
        t = now
    if laid.plan.num_replicas:  # forward's spAG / spRS plan: plan_layer's, its row maps on the device
        device_plan(case.owner, laid.plan.holders_WE, 0, CPU, planned=laid.sparse)
    if stages is not None:
        stages["sparse"] = stages.get("sparse", 0.0) + clock() - t
        stages["_out_bytes"] = laid.plan.holders_WE.nbytes + layout.recv_WE.nbytes + bins.nbytes
    return laid.plan.holders_WE, laid.plan.routes


def op_args(case: Case):
    """The fused op's arguments as plan_layer passes them in plan_new."""
    f = ReplicaFit(**FIT)
    return (case.counts, case.owner, case.nodes, case.predictor.predict(), None, case.m, case.t, True,
            f.chunk_passes * f.chunk_bytes, f.token_bytes, float(f.fixed_bytes), 0, True, case.history)


def op_stages_us(case: Case, repeat: int) -> dict:
    """The fused op's stages timed as their own ops on the same inputs (us, min of `repeat`),
    each minus the same op on a 2-rank case (the dispatch every op call pays)."""
    ops, f = torch.ops.hecate, ReplicaFit(**FIT)
    cost = f.chunk_passes * f.chunk_bytes
    load = case.predictor.predict()
    p1 = ops.place_experts(load, case.owner, case.nodes, case.m, case.t)
    fitted = ops.fit_replicas(p1, case.owner, case.counts, cost, f.token_bytes, case.m, 0.0)
    tiny = Case(2, 2, 1, "uniform", 8, 2)
    tiny_load, tiny_all = tiny.predictor.predict(), torch.ones(2, 2, dtype=torch.bool)
    pairs = {
        "place": (lambda: ops.place_experts(load, case.owner, case.nodes, case.m, case.t),
                  lambda: ops.place_experts(tiny_load, tiny.owner, tiny.nodes, tiny.m, tiny.t)),
        "fit": (lambda: ops.fit_replicas(p1, case.owner, case.counts, cost, f.token_bytes, case.m, 0.0),
                lambda: ops.fit_replicas(tiny_all, tiny.owner, tiny.counts, cost, f.token_bytes, tiny.m, 0.0)),
        "routes": (lambda: ops.route_layout(fitted, case.counts, case.nodes, 0, False),
                   lambda: ops.route_layout(tiny_all, tiny.counts, tiny.nodes, 0, False)),
        "sparse": (lambda: ops.sparse_plan(case.owner, fitted, 0), lambda: ops.sparse_plan(tiny.owner, tiny_all, 0)),
    }
    out = {}
    for name, (fn, base) in pairs.items():
        runs = [(cpu_ms(fn, 1)[0], cpu_ms(base, 1)[0]) for _ in range(repeat)]
        out[name] = round(1e3 * (min(r[0] for r in runs) - min(r[1] for r in runs)), 1)
    return out


def plan_staged(case: Case, stages: dict | None = None):
    """The staged path plan_new replaced: one call per stage, Python between them."""
    clock = time.process_time
    t = clock()

    def lap(name):
        nonlocal t
        if stages is not None:
            now = clock()
            stages[name] = stages.get(name, 0.0) + now - t
            t = now

    case.predictor.update_from_rank_counts(case.counts)
    load = case.predictor.predict()
    case.counts.to(torch.float64)  # the staged runtime's rank_history entry (plan_layer writes it in place)
    lap("load")
    holders = case.policy.plan(load, case.owner, case.nodes, case.m, counts_WE=case.counts)
    lap("p1")
    holders = fit_holders(holders, case.owner, case.counts, capacity_m=case.m, **FIT)
    lap("fit")
    routes = route_tokens(holders, case.counts, case.nodes, rank=0)  # rank 0's layout made with them
    lap("routes")
    layout = routes.layout(0)
    lap("splits")
    bins = FullyShardedSparse._destination_bins(case.indices, case.E, layout)
    lap("bins")
    if routes.num_holders > case.E:  # replicas: an spAG / spRS to plan
        plan_sparse(case.owner, holders, 0)
    lap("sparse")
    if stages is not None:
        stages["_out_bytes"] = holders.nbytes + layout.recv_WE.nbytes + bins.nbytes
    return holders, routes


def plan_reference(case: Case, ref):
    """The same steps with the dense planner it replaced."""
    case.predictor.update_from_rank_counts(case.counts)
    load = case.predictor.predict().numpy()
    owner, nodes, counts = case.owner.numpy(), case.nodes.numpy(), case.counts.numpy()
    quota = proportional_quota(load, case.W * case.m, case.W - 1)
    holders = ref.place(load, owner, nodes, case.m, 4 * case.m, quota)
    holders = ref.fit_holders(holders, owner, counts, FIT["chunk_bytes"], FIT["token_bytes"],
                              FIT["chunk_passes"], case.m)
    routes = ref.routes(holders, counts, nodes)
    send_WE = torch.from_numpy(np.ascontiguousarray(routes[0].T))
    ref.destination_bins(case.indices, case.counts_E, send_WE)
    holders_t = torch.from_numpy(holders)
    if bool(holders_t.sum() > case.E):
        plan_sparse(case.owner, holders_t, 0)
    return holders, routes


def cpu_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return min(times), statistics.median(times)


def peak_mib(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def growth_exponent(ws, ms):
    if len(ws) < 2:
        return None
    b, _ = np.polyfit(np.log(ws), np.log(np.maximum(ms, 1e-6)), 1)
    return round(float(b), 3)


def scale_grid(args):
    ref = None
    if args.reference:
        sys.path.insert(0, str(ROOT / "tests"))
        import fssdp_reference_planner as ref
    rows = []
    for E in args.experts:
        for k in args.top_k:
            for routing in args.routing:
                for W in args.ranks:
                    case = Case(W, E, k, routing, args.tokens_per_rank, args.ranks_per_node)
                    plan_new(case)  # warm up (imports, caches)
                    plan_staged(case)
                    # Interleaved, so that a burst of load on a shared machine hits both alike.
                    runs = [(cpu_ms(lambda: plan_new(case), 1)[0], cpu_ms(lambda: plan_staged(case), 1)[0])
                            for _ in range(args.repeat)]
                    best, med = min(r[0] for r in runs), statistics.median(r[0] for r in runs)
                    sbest = min(r[1] for r in runs)
                    stages, staged_stages = {}, {}
                    plan_best = op_best = float("inf")
                    args_op = op_args(case)
                    for _ in range(args.repeat):
                        one = {}
                        plan_new(case, one)
                        plan_best = min(plan_best, one["plan"] * 1e3)
                        for n, v in one.items():
                            stages[n] = v if n == "_out_bytes" else stages.get(n, 0.0) + v
                        plan_staged(case, staged_stages)
                        op_best = min(op_best, cpu_ms(lambda: _op()(*args_op), 1)[0])
                    holders, routes = plan_new(case)
                    s_holders, s_routes = plan_staged(case)
                    staged_stages.pop("_out_bytes")
                    row = {"W": W, "E": E, "top_k": k, "routing": routing, "m": case.m,
                           "replicas": int(holders.sum()) - E, "ms_min": round(best, 3),
                           "ms_median": round(med, 3), "staged_ms_min": round(sbest, 3),
                           "staged_over_fused": round(sbest / max(best, 1e-6), 2),
                           "same_plan_as_staged": bool(torch.equal(holders, s_holders) and np.array_equal(
                               routes.layout(0).recv_WE, s_routes.layout(0).recv_WE)),
                           "peak_mib": round(peak_mib(lambda: plan_new(case)), 2),
                           "out_kib": round(stages.pop("_out_bytes") / 2**10, 1),
                           "stages_ms": {n: round(v * 1e3 / args.repeat, 3) for n, v in stages.items()},
                           "staged_stages_ms": {n: round(v * 1e3 / args.repeat, 3)
                                                for n, v in staged_stages.items()},
                           "fused_ms": {"op": round(op_best, 3), "wrap": round(plan_best - op_best, 3)}}
                    if args.breakdown:
                        row["op_stages_us"] = op_stages_us(case, args.repeat)
                    if ref is not None and W <= args.reference_max_ranks:
                        ref_holders, ref_routes = plan_reference(case, ref)
                        row["same_plan_as_reference"] = bool(
                            np.array_equal(ref_holders, holders.numpy())
                            and np.array_equal(ref_routes, routes.dense()))
                        rbest, rmed = cpu_ms(lambda: plan_reference(case, ref), args.repeat)
                        row["reference_ms_min"] = round(rbest, 3)
                        row["reference_peak_mib"] = round(peak_mib(lambda: plan_reference(case, ref)), 2)
                        row["reference_over_new"] = round(rbest / max(best, 1e-6), 2)
                    rows.append(row)
                    if not args.json:
                        print(_fmt(row), flush=True)
    series = {}
    for row in rows:
        series.setdefault((row["E"], row["top_k"], row["routing"]), []).append(row)
    growth = {f"E={E} k={k} {routing}": growth_exponent([r["W"] for r in rs], [r["ms_min"] for r in rs])
              for (E, k, routing), rs in series.items()}
    return {"tokens_per_rank": args.tokens_per_rank, "ranks_per_node": args.ranks_per_node,
            "cpu_threads": torch.get_num_threads(), "rows": rows, "growth_exponent_in_W": growth}


def _fmt(row):
    text = (f"W={row['W']:5d} E={row['E']:4d} k={row['top_k']} {row['routing']:8s} "
            f"replicas={row['replicas']:5d}  {row['ms_min']:7.3f} ms/layer (median "
            f"{row['ms_median']:.3f}; staged {row['staged_ms_min']:.3f}, {row['staged_over_fused']}x, "
            f"same plan: {row['same_plan_as_staged']})  peak {row['peak_mib']:5.2f} MiB + "
            f"{row['out_kib']:7.1f} KiB  " + " ".join(f"{n}={v:.2f}" for n, v in row["stages_ms"].items())
            + f" (op={row['fused_ms']['op']:.3f} wrap={row['fused_ms']['wrap']:.3f})"
            + "  | staged " + " ".join(f"{n}={v:.2f}" for n, v in row["staged_stages_ms"].items()))
    if "op_stages_us" in row:
        text += "  | op stages us " + " ".join(f"{n}={v:.1f}" for n, v in row["op_stages_us"].items())
    if "reference_ms_min" in row:
        text += (f"  | reference {row['reference_ms_min']:.3f} ms, {row['reference_peak_mib']:.1f} MiB"
                 f" ({row['reference_over_new']}x, same plan: {row['same_plan_as_reference']})")
    return text


def policies_table(args):
    """The older table: every policy, all layers of one step, at one size."""
    L, E, W, m = args.layers, args.experts[0], args.ranks[0], args.capacity
    rng = np.random.default_rng(0)
    nodes = node_of_ranks(W, args.ranks_per_node)
    counts_L = [zipf_counts(rng, W, E, args.tokens_per_rank) for _ in range(L)]
    loads_LE = torch.stack([c.sum(0) for c in counts_L]).double()
    owner_LE = heterogeneous_sharding(loads_LE, W, args.ranks_per_node, m)
    cm = CostModel(intra_node_bw=150e9, inter_node_bw=12.5e9, chunk_bytes=2 * 768 * 1536 * 2,
                   t_non_moe=2e-3, token_compute_s=2e-8, token_bytes=768 * 2)
    predictors = [LoadPredictor(E) for _ in range(L)]

    def all_layers(policy):
        def run():
            for l in range(L):
                predictors[l].update_from_rank_counts(counts_L[l])
                build_plan(policy, predictors[l].predict(), owner_LE[l], counts_L[l], nodes, m)
        return run

    cases = {
        "hecate_top_t (t <= m)": HecatePolicy(overlap_degree=m),
        "hecate_proportional (t > m)": HecatePolicy(overlap_degree=4 * m),
        "hecate_calibrated": HecatePolicy(cm, calibrate=True),
        "shadowing": ShadowingPolicy(cm),
        "no_replication": NoReplicationPolicy(),
    }
    result = {"layers": L, "experts": E, "ranks": W, "ranks_per_node": args.ranks_per_node,
              "capacity_m": m, "overlap_degree_model": cm.overlap_degree(True),
              "ms_per_step_all_layers": {}}
    for name, policy in cases.items():
        result["ms_per_step_all_layers"][name] = round(cpu_ms(all_layers(policy), args.repeat)[0], 3)
    result["ms_heterogeneous_sharding_all_layers"] = round(cpu_ms(
        lambda: heterogeneous_sharding(loads_LE, W, args.ranks_per_node, m), args.repeat)[0], 3)
    if not args.json:
        print(f"planning {L} layers x {E} experts x {W} ranks ({W // args.ranks_per_node} nodes), m={m}")
        for name, ms in result["ms_per_step_all_layers"].items():
            print(f"  {name:32s} {ms:9.3f} ms per step (all layers: load + P1 + routes)")
        print(f"  {'heterogeneous_sharding':32s} {result['ms_heterogeneous_sharding_all_layers']:9.3f}"
              " ms per re-shard (all layers)")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024])
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--routing", nargs="+", default=["uniform", "skewed"],
                    choices=["uniform", "skewed"])
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per rank (x top-k entries)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--reference", action="store_true", help="also time the dense planner it replaced")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the fused op's stages as their own ops (op_stages_us)")
    ap.add_argument("--reference-max-ranks", type=int, default=64)
    ap.add_argument("--policies", action="store_true", help="the per-policy table at one size instead")
    ap.add_argument("--layers", type=int, default=12, help="--policies: MoE layers")
    ap.add_argument("--capacity", type=int, default=4, help="--policies: memory capacity m")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.policies:
        if args.ranks == ap.get_default("ranks"):
            args.ranks = [32]
        if args.experts == ap.get_default("experts"):
            args.experts = [64]
        if args.tokens_per_rank == ap.get_default("tokens_per_rank"):
            args.tokens_per_rank = 8192
        result = policies_table(args)
    else:
        result = scale_grid(args)
        if not args.json:
            for name, b in result["growth_exponent_in_W"].items():
                print(f"growth exponent in W ({name}): {b}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
