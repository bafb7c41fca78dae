"""`hecate simulate --calibrate`: measure this machine as a Hardware for the step model.

* gemm_flops: a [4096, 256] x [256, 1024] fp32 matmul on one torch thread (what each rank of
  the CPU benchmarks uses), median of repeats;
* adam_params_per_s: the runtime's fused AdamW (hecate.train.engine's default) on 4M fp32
  parameters;
* alpha, beta: 2 gloo ranks on this host (hecate.testing.run_distributed) time the runtime's
  all_to_all_v (Python wrapper included) with 64 B and 8 MiB per peer; alpha is the small one,
  beta = bytes / (large - small). Both ranks share a host, so intra- and inter-node links get the same
  figures, and ranks_per_node is 2 (the CPU benchmarks' layout);
* framework_s: host seconds per MoE layer each strategy's runtime spends beyond what the step
  model counts (framework_costs): 2 gloo ranks step a small MoE model (CALIBRATION_MODEL, 16
  tokens per rank, so FLOPs are a small part) under local, ep, fssdp without replicas and
  fssdp with replicas; each measured step minus the step model's prediction for it (FLOPs,
  every collective's alpha + bytes / beta, fssdp's planning replayed through the runtime
  planner) minus the all-local model's excess, per MoE layer.
Median over repeats; the machine is shared, so calibrate right before comparing.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
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


def link_probe(world: int, sizes) -> dict:
    """Seconds of one call of hecate's all_to_all_v (the runtime's token exchange, Python
    included) sending `n` bytes to every peer, for each n in `sizes`, each after a barrier."""
    import torch.distributed as dist

    from hecate.comm.all_to_all import all_to_all_v

    out = {}
    for n in sizes:
        rows = max(n // 64, 1)
        x = torch.zeros(rows * world, 16)
        dist.barrier()
        t = time.perf_counter()
        all_to_all_v(x, [rows] * world, [rows] * world)
        out[n] = time.perf_counter() - t
    return out


def _link_task(rank, world, sizes, repeats):
    """Median seconds of link_probe for each n in `sizes` (after one warm-up call)."""
    link_probe(world, sizes)
    runs = [link_probe(world, sizes) for _ in range(repeats)]
    return {n: statistics.median(r[n] for r in runs) for n in sizes}


def link_rates(small: int = 64, large: int = 8 << 20, repeats: int = 9) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of a 2-rank gloo all_to_all on this host."""
    from hecate.testing import run_distributed

    res = run_distributed(_link_task, 2, [small, large], repeats)
    t_small = max(r[small] for r in res)
    t_large = max(r[large] for r in res)
    return t_small, (large - small) / max(t_large - t_small, 1e-9)


def framework_rates(hw: Hardware, steps: int = 10, warmup: int = 2) -> dict:
    """framework_costs on CALIBRATION_MODEL: 2 gloo ranks step every FRAMEWORK_CASES case at
    each CALIBRATION_TOKENS size."""
    from hecate.testing import run_distributed

    cfg = calibration_model_config()
    results = {batch * seq: run_distributed(strategy_steps_task, 2, cfg, batch, seq, steps, timeout=600)
               for batch, seq in CALIBRATION_TOKENS}
    return framework_costs(results, cfg, hw, warmup)


def calibrate(path: str | Path | None = None) -> Hardware:
    alpha, beta = link_rates()
    hw = Hardware("calibrated", ranks_per_node=2, gemm_flops=gemm_rate(), adam_params_per_s=adam_rate(),
                  alpha_intra=alpha, bw_intra=beta, alpha_inter=alpha, bw_inter=beta, wire_bytes=4,
                  note=f"measured on this host at {time.strftime('%Y-%m-%d %H:%M:%S')}: 1 torch thread, "
                       "2 gloo ranks on loopback (intra = inter)")
    hw = replace(hw, framework_s=framework_rates(hw)["framework_s"])
    out = Path(path) if path else CALIBRATION_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(hw.to_json())
    tmp.replace(out)
    return hw


# What each framework term is measured on: a calibration step of this strategy (build_strategy
# options), and the term it leaves once its modelled time is taken off. "fssdp" with the
# no-replication policy and no byte fit (which could add replicas): P1 = P0, no spAG / spRS;
# "fssdp.replicated" with t pinned to 2 and no byte fit, so every layer with load history holds
# replicas: its excess over "fssdp" is the extra of a replicated layer. "local" (every expert on
# the rank, no collective) is the framework time every strategy shares.
FRAMEWORK_CASES = {
    "local": ("local", {}),
    "ep": ("ep", {}),
    "fssdp": ("fssdp", {"policy": "none", "fit_replicas": False, "reshard_interval": 0}),
    "fssdp.replicated": ("fssdp", {"fit_replicas": False, "overlap_degree": 2, "reshard_interval": 0}),
}
# The calibration model of `hecate simulate --calibrate` (benchmarks/strategies.py's tiny model).
CALIBRATION_MODEL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, ffn=128,
                         num_experts=16, top_k=2)
# (batch, sequence) per rank of the calibration steps. One size (the default): fixed terms per
# MoE layer. Two sizes: fixed + per token (host work that grows with the tokens: permutes,
# destination bins, fssdp's concatenation of its owned and replica expert blocks); on the loaded
# 2-core machine the per-token part came out at 0-345 us per token per layer between repeats,
# and extrapolated to the runs' 1024-4096 tokens it swamped the prediction, so it is off.
CALIBRATION_TOKENS = ((2, 64),)


def calibration_model_config(m: dict | None = None):
    from hecate.models.transformer import TransformerConfig
    from hecate.moe.config import MoEConfig

    m = m or CALIBRATION_MODEL
    moe = MoEConfig(hidden_size=m["d_model"], ffn_hidden_size=m["ffn"], num_experts=m["num_experts"],
                    top_k=m["top_k"], aux_loss_coeff=0.01, aux_free_bias=True, bias_update_rate=0.0)
    return TransformerConfig(vocab_size=m["vocab_size"], d_model=m["d_model"], n_layers=m["n_layers"],
                             n_heads=m["n_heads"], max_seq_len=m["max_seq_len"], dense_ffn_hidden=m["ffn"],
                             moe_every=1, moe=moe)


class CaseSteps:
    """Copies of one model (`model_cfg`, a hecate TransformerConfig), one per case (name ->
    (strategy, build_strategy options); FRAMEWORK_CASES by default), stepped on `batch` x
    `seq` tokens per rank. `step(i)` runs one timed training step of every case, their order
    reversed every other step, each between barriers (1 torch thread per rank). `bias_E`: the
    routers' expert bias (skewed routing), zeros by default."""

    def __init__(self, model_cfg, batch: int, seq: int, cases=None, bias_E=None):
        import copy

        from hecate.comm.topology import Topology
        from hecate.models.transformer import MoETransformer
        from hecate.parallel import build_strategy, moe_layers, parallelize
        from hecate.train.engine import Engine

        self.cases = FRAMEWORK_CASES if cases is None else cases
        self.cfg, self.batch, self.seq = model_cfg, batch, seq
        torch.set_num_threads(1)
        torch.manual_seed(0)
        base = MoETransformer(model_cfg)
        if bias_E is not None:
            for layer in moe_layers(base):
                layer.router.expert_bias_E.copy_(torch.as_tensor(bias_E))
        self.runs, self.topologies = {}, {}
        for key, (name, options) in self.cases.items():
            topo = None if name == "local" else Topology()
            strat = build_strategy(name, topo, **options)
            model = parallelize(copy.deepcopy(base), strat)
            self.runs[key] = (model, Engine(model, strat, topo, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0))
            self.topologies[key] = topo
        self.times = {key: [] for key in self.cases}
        self.counts = {key: [] for key in self.cases}
        self.calls = {key: [] for key in self.cases}  # collectives CommStats counted per step

    def step(self, i: int) -> None:
        import torch.distributed as dist

        rank = dist.get_rank()
        g = torch.Generator().manual_seed(104729 + 7919 * i + rank)
        tokens = torch.randint(0, self.cfg.vocab_size, (self.batch, self.seq + 1), generator=g)
        order = list(self.cases) if i % 2 == 0 else list(reversed(list(self.cases)))
        for key in order:
            model, engine = self.runs[key]
            dist.barrier()
            start = time.perf_counter()
            loss, res = model.loss(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            engine.step()
            dist.barrier()
            self.times[key].append(time.perf_counter() - start)
            self.counts[key].append(torch.stack([s.tokens_per_expert_E for s in res.moe_stats]).tolist())
            topo = self.topologies[key]
            self.calls[key].append(sum(v["calls"] for v in topo.stats.reset().values()) if topo else 0)

    def planner_options(self, key: str) -> dict:
        """The options case `key`'s fssdp planner ran with, defaults resolved as the runtime
        resolved them (its backend's bandwidth and collective latency): a replay of its routing
        must plan with these, not with the calibrated hardware's figures."""
        strat = self.runs[key][1].strategy
        out = {"bandwidth": tuple(strat.bandwidth), "token_compute_s": strat.token_compute_s}
        if getattr(strat, "collective_latency_s", None) is not None:
            out["collective_latency_s"] = strat.collective_latency_s
        return out

    def result(self) -> dict:
        return {"times": self.times, "counts": self.counts, "calls": self.calls,
                "planner": {key: self.planner_options(key) for key, (name, _) in self.cases.items()
                            if name == "fssdp"}}


def strategy_steps_task(rank, world, model_cfg, batch: int, seq: int, steps: int, cases=None, bias_E=None):
    """`steps` steps of CaseSteps; returns {"times": {case: [seconds per step]}, "counts": {case:
    [per step, this rank's [L, E] token counts]}}."""
    runner = CaseSteps(model_cfg, batch, seq, cases, bias_E)
    for i in range(steps):
        runner.step(i)
    return runner.result()


def local_excess_s(measured_s: float, shape, hw: Hardware, tokens: int) -> float:
    """Seconds of a one-rank step with every expert local that the FLOP model misses: measured
    minus forward + backward FLOPs (dense and routed, 3x forward) and the AdamW step."""
    flops = 3 * tokens * (shape.dense_flops_per_token() + shape.top_k * shape.expert_flops_per_entry())
    return measured_s - flops / hw.gemm_flops - (shape.dense_params + shape.routed_params) / hw.adam_params_per_s


def _fitted_term(results, model_cfg, hw: Hardware, tokens: int, warmup: int, key: str,
                 count_planning: bool = True) -> float:
    """Seconds per MoE layer of term `key` at this token count: the value with which the step
    model (hw.framework_s as fitted so far, the local model's excess as overhead_s, fssdp's
    plans replayed from the case's recorded counts) predicts the case's measured step (slowest
    rank; the median local step plus the median over the steps after `warmup` of the case's
    step minus the local step of the same iteration). Bisection: the predicted step grows with the
    term (less than one for one where fssdp's host time hides asynchronous gathers). Negative
    when the model without the term already predicts more than was measured (noise)."""
    import dataclasses
    import statistics

    from hecate.sim.shape import shape_of_config
    from hecate.sim.step import StepSetup, replay_fssdp, simulate_steps

    W = len(results)
    shape = shape_of_config(model_cfg, "calibration")
    n_moe = len(shape.moe_layers)
    steps = len(results[0]["times"][key])

    def measured(case):
        return statistics.median(max(r["times"][case][i] for r in results) for i in range(warmup, steps))

    local = local_excess_s(measured("local"), shape, hw, tokens)
    name, options = FRAMEWORK_CASES[key]
    trace = [[[r["counts"][key][s][layer] for r in results] for layer in range(n_moe)] for s in range(steps)]
    planner = {**options, **results[0].get("planner", {}).get(key, {})} if name == "fssdp" else {}
    setup = StepSetup(shape, hw, W, tokens, fssdp_options=planner, overhead_s=max(local, 0.0),
                      count_planning=count_planning)
    plans = replay_fssdp(setup, trace) if name == "fssdp" else None

    def predicted(x: float) -> dict:
        fw = {**hw.framework_s, key: [x, 0.0]}
        return simulate_steps(dataclasses.replace(setup, hw=dataclasses.replace(hw, framework_s=fw)), trace,
                              (name,), warmup=warmup, fssdp_plans=plans)[name]

    # The case's step relative to the local step run beside it (same iteration, same load),
    # median over the steps, plus the local median: load drift between iterations cancels.
    slowest = {c: [max(r["times"][c][i] for r in results) for i in range(warmup, steps)] for c in (key, "local")}
    target = measured("local") + statistics.median(a - b for a, b in zip(slowest[key], slowest["local"]))
    base = predicted(0.0)
    per = n_moe if key != "fssdp.replicated" else base["replicated_layers"]
    if per <= 0:
        raise RuntimeError(f"framework calibration: case {key!r} ran no layer to measure "
                           "(no replicated layer in the replay)")
    if target <= base["seconds"]:
        return (target - base["seconds"]) / per
    lo, hi = 0.0, (target - base["seconds"]) / per
    while predicted(hi)["seconds"] < target:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid)["seconds"] < target else (lo, mid)
    return (lo + hi) / 2


def framework_costs(results_by_tokens: dict, model_cfg, hw: Hardware, warmup: int = 2,
                    count_planning: bool = True) -> dict:
    """Hardware.framework_s from strategy_steps_task's results at one or two token counts per
    rank ({tokens: results, one per rank}; FRAMEWORK_CASES).

    For each term, the seconds per MoE layer with which the step model reproduces its case's
    measured step (_fitted_term: the model counts FLOPs, every collective's alpha + bytes /
    beta, fssdp's planning timed by replaying the case's recorded counts through the runtime
    planner, and the all-local model's excess, the framework time every strategy shares) at
    two token counts gives a line: fixed seconds per layer + seconds per token per rank (host
    work that grows with the tokens but that the FLOP count misses: permutes, bins, copies);
    at one token count, a fixed term (0 per token).
    "fssdp.replicated" is fitted after "fssdp", as its extra. Both clamped at 0 (noise can make
    them negative).
    `count_planning` False leaves fssdp's replayed planning time out of the model (tests: it
    is timed on this host). Returns {"framework_s": {key: [fixed_s, per_token_s]}, "raw_s":
    {key: {tokens: excess}}}."""
    import dataclasses

    sizes = sorted(results_by_tokens)
    if len(sizes) not in (1, 2):
        raise ValueError(f"framework_costs takes results at one or two token counts, got {sizes}")
    small, large = sizes[0], sizes[-1]
    framework, raw = {}, {}
    for key in ("ep", "fssdp", "fssdp.replicated"):
        fitted = dataclasses.replace(hw, framework_s=dict(framework))
        raw[key] = {n: _fitted_term(results_by_tokens[n], model_cfg, fitted, n, warmup, key, count_planning)
                    for n in sizes}
        per_token = max((raw[key][large] - raw[key][small]) / (large - small), 0.0) if large > small else 0.0
        framework[key] = [max(raw[key][small] - per_token * small, 0.0), per_token]
    return {"framework_s": framework, "raw_s": raw}
