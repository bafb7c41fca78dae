"""Whole-step time of one training iteration under ep, fsdp or fssdp, on a Hardware model.

What a step is made of (per rank; phases that synchronize ranks take the slowest rank):

* dense compute: attention + dense FFN + shared experts + LM head, forward 2 FLOPs per matmul
  parameter per token (+ causal attention scores), backward twice the forward, at
  `gemm_flops`; spread evenly over the blocks;
* MoE layers: expert compute = entries a rank serves x 2 x expert parameters (x3 for forward
  + backward), the slowest rank; token all-to-alls (dispatch, combine, their backward mirrors)
  and weight collectives costed alpha + bytes / beta per link class, from the plans the
  runtime's own planner makes (hecate.sim.plans) for the routing trace;
* fssdp's overlap as the runtime schedules it: layer l+1's spAG prefetched at the end of layer
  l runs on the weight group while blocks compute and is waited for when layer l+1 needs it
  (the first MoE layer, and any layer without load history, gathers blocking); with
  re-materialization each layer's backward starts the previous MoE layer's re-gather (the
  last MoE layer's is blocking); spRS runs asynchronously and is waited for after backward;
* dense gradient sync (ep, fsdp: all-reduce; fssdp: reduce-scatter + all-gather of the sharded
  dense optimizer) and the AdamW step over the parameters each rank owns;
* fssdp's planning, as long as the runtime's planner took for the layer on this host (it runs
  on the critical path, on every rank); `overhead_s`, a per-step framework time that a FLOP
  count misses and every strategy shares (measured on CPU runs; 0 for the GPU presets); and
  each strategy's own framework time per MoE layer (Hardware.framework_s: fixed + per token,
  plus fssdp's extra on a layer with replicas; calibrated, hecate.sim.calibrate; 0 for the
  GPU presets).

Every collective is one phase that pays its alpha; each step's count of them is reported as
`calls` (the calls CommStats counts per rank).

Two timelines per step: compute + token collectives (blocking, in order), and the weight group
(asynchronous gathers / reduces, in issue order). Link sharing between the two and contention
inside a node are not modelled; nor are kernel launch overheads on the GPU presets.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from hecate.sim.hardware import Hardware
from hecate.sim.plans import (FssdpReplay, Traffic, chunk_traffic, ep_tokens_WW, token_traffic,
                              traffic_of_WW, uniform_traffic_fast)
from hecate.sim.shape import ModelShape

STRATEGIES = ("ep", "fsdp", "fssdp", "fssdp_hybrid")


def phase_time(t: Traffic, hw: Hardware, multi_node: bool) -> float:
    """alpha + the slowest rank's max(send, receive) time, intra- and inter-node bytes each at
    their link's bandwidth."""
    send = t.send_intra / hw.bw_intra + t.send_inter / hw.bw_inter
    recv = t.recv_intra / hw.bw_intra + t.recv_inter / hw.bw_inter
    alpha = hw.alpha_inter if multi_node else hw.alpha_intra
    return alpha + float(np.max(np.maximum(send, recv))) if len(send) else 0.0


@dataclass
class _Timeline:
    now: float = 0.0           # compute + token collectives (blocking)
    weight_free: float = 0.0   # the weight group (asynchronous gathers / reduces)
    parts: dict = field(default_factory=dict)
    calls: int = 0             # collectives issued (as CommStats counts them: one per call)

    def run(self, what: str, seconds: float, calls: int = 0) -> None:
        self.now += seconds
        self.parts[what] = self.parts.get(what, 0.0) + seconds
        self.calls += calls

    def issue(self, seconds: float) -> float:
        start = max(self.now, self.weight_free)
        self.weight_free = start + seconds
        self.calls += 1
        return self.weight_free

    def wait(self, what: str, end: float) -> None:
        if end > self.now:
            self.parts[what] = self.parts.get(what, 0.0) + end - self.now
            self.now = end


@dataclass(frozen=True)
class StepSetup:
    shape: ModelShape
    hw: Hardware
    world_size: int
    tokens_per_rank: int        # tokens (sequence positions) per rank per step
    fssdp_options: dict = field(default_factory=dict)
    hybrid_group: int = 0       # fssdp_hybrid's shard group size G (0: one node)
    overhead_s: float = 0.0     # per-step framework time the FLOP model misses (calibrated, CPU runs)
    count_planning: bool = True  # charge fssdp's planning, timed on this host, to its step

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.hw.ranks_per_node

    @property
    def ranks_per_node(self) -> int:
        return min(self.hw.ranks_per_node, self.world_size)

    def node_of_W(self) -> np.ndarray:
        return np.arange(self.world_size) // self.ranks_per_node

    def dense_block_s(self) -> float:
        """Forward seconds of one block's dense part (attention etc.) on one rank."""
        s = self.shape
        return self.tokens_per_rank * s.dense_flops_per_token() / self.hw.gemm_flops / s.n_layers

    def expert_s(self, entries) -> np.ndarray:
        return np.asarray(entries, dtype=np.float64) * self.shape.expert_flops_per_entry() / self.hw.gemm_flops

    def token_row_bytes(self) -> int:
        return self.shape.d_model * self.hw.wire_bytes

    def chunk_bytes(self) -> int:
        return self.shape.chunk_numel * self.hw.wire_bytes


def framework_s(setup: StepSetup, key: str) -> float:
    """Host seconds per MoE layer per step of a strategy beyond what the model counts:
    Hardware.framework_s[key] = (fixed seconds, seconds per token per rank), calibrated; 0
    when not measured."""
    fixed, per_token = setup.hw.framework_s.get(key, (0.0, 0.0))
    return float(fixed) + float(per_token) * setup.tokens_per_rank


def _blocks(setup: StepSetup):
    """(block index, MoE layer ordinal or None) in forward order."""
    moe = {b: j for j, b in enumerate(setup.shape.moe_layers)}
    return [(b, moe.get(b)) for b in range(setup.shape.n_layers)]


def _optimizer_and_dense_sync(tl: _Timeline, setup: StepSetup, strategy: str) -> None:
    s, hw, W = setup.shape, setup.hw, setup.world_size
    node = setup.node_of_W()
    dense_bytes = s.dense_params * 4  # fp32 gradients / parameters
    owned_experts = s.routed_params / W
    if W > 1:
        if strategy == "fssdp":  # ZeRO-1: reduce-scatter gradients, step the shard, all-gather
            shard = math.ceil(s.dense_params / W) * 4 * (W - 1)
            tl.run("dense_sync", phase_time(uniform_traffic_fast(shard, node), hw, setup.multi_node), calls=1)
        else:
            ring = 2 * (W - 1) * dense_bytes / W
            tl.run("dense_sync", phase_time(uniform_traffic_fast(ring, node), hw, setup.multi_node), calls=1)
    if setup.overhead_s:
        tl.run("overhead", setup.overhead_s)
    dense_stepped = s.dense_params / W if strategy == "fssdp" else s.dense_params
    tl.run("optimizer", (dense_stepped + owned_experts) / hw.adam_params_per_s)
    if W > 1 and strategy == "fssdp":
        shard = math.ceil(s.dense_params / W) * 4 * (W - 1)
        tl.run("dense_sync", phase_time(uniform_traffic_fast(shard, node), hw, setup.multi_node), calls=1)


def ep_step(setup: StepSetup, counts_LWE) -> dict:
    """Seconds of one ep step (ep_size = W) for the per-MoE-layer counts [W, E]."""
    hw, node, multi, W = setup.hw, setup.node_of_W(), setup.multi_node, setup.world_size
    E = setup.shape.num_experts
    # ep_size = W when it divides E; beyond E ranks, EP groups of E ranks (one expert each)
    # replicated over W / E expert-data-parallel groups that all-reduce expert gradients.
    ep = W if E % W == 0 else E
    if W % ep:
        raise ValueError(f"ep on {W} ranks needs W to divide the {E} experts or be a multiple of them")
    row = setup.token_row_bytes()
    tl = _Timeline()
    per_layer = []
    for counts_WE in counts_LWE:
        tokens_WW = ep_tokens_WW(counts_WE, ep)
        a2a = phase_time(traffic_of_WW(tokens_WW * row, node), hw, multi)
        counts = hw.alpha_inter if multi else hw.alpha_intra
        served = tokens_WW.sum(0)
        per_layer.append((a2a, counts, setup.expert_s(served).max()))
    blk = setup.dense_block_s()
    host = framework_s(setup, "ep")
    for b, j in _blocks(setup):
        tl.run("dense", blk)
        if j is not None:
            a2a, counts, expert = per_layer[j % len(per_layer)]
            tl.run("framework", host)
            tl.run("counts", counts, calls=1)
            tl.run("all_to_all", 2 * a2a, calls=2)
            tl.run("experts", expert)
    for b, j in reversed(_blocks(setup)):
        tl.run("dense", 2 * blk)
        if j is not None:
            a2a, _, expert = per_layer[j % len(per_layer)]
            tl.run("all_to_all", 2 * a2a, calls=2)
            tl.run("experts", 2 * expert)
    if W > ep:  # EDP all-reduce of every MoE layer's local expert gradients (fp32 ring)
        k = W // ep
        local = setup.shape.chunk_numel * (E // ep) * 4 * len(setup.shape.moe_layers)
        edp = uniform_traffic_fast(2 * (k - 1) * local / k, node)
        edp.send_inter = edp.send_intra + edp.send_inter  # EDP peers are ep ranks apart: other nodes
        edp.recv_inter = edp.send_inter.copy()
        edp.send_intra = edp.recv_intra = np.zeros(W)
        # one phase for all MoE layers (the runtime all-reduces each expert tensor of each layer)
        tl.run("edp_all_reduce", phase_time(edp, hw, multi), calls=len(setup.shape.moe_layers))
    _optimizer_and_dense_sync(tl, setup, "ep")
    return {"seconds": tl.now, "parts": tl.parts, "calls": tl.calls, "replicated_layers": 0}


def fsdp_step(setup: StepSetup, counts_LWE) -> dict:
    """fsdp (ZeRO-3 of the experts): every MoE layer all-gathers all of its experts before the
    forward and reduce-scatters their gradients after the backward; tokens stay home."""
    hw, node, multi, W = setup.hw, setup.node_of_W(), setup.multi_node, setup.world_size
    E = setup.shape.num_experts
    # fsdp gathers the fp32 flat shards (no bf16 wire), (W-1)/W of all E chunks per rank
    gather = phase_time(uniform_traffic_fast(setup.shape.chunk_numel * 4 * E * (W - 1) / W, node), hw, multi)
    tl = _Timeline()
    blk = setup.dense_block_s()
    served = [np.asarray(c).sum(1) for c in counts_LWE]
    host = framework_s(setup, "fsdp")
    for b, j in _blocks(setup):
        tl.run("dense", blk)
        if j is not None:
            tl.run("framework", host)
            tl.run("weight_gather", gather, calls=1)
            tl.run("experts", setup.expert_s(served[j % len(served)]).max())
    for b, j in reversed(_blocks(setup)):
        tl.run("dense", 2 * blk)
        if j is not None:
            tl.run("experts", 2 * setup.expert_s(served[j % len(served)]).max())
            tl.run("grad_reduce", gather, calls=1)
    _optimizer_and_dense_sync(tl, setup, "fsdp")
    return {"seconds": tl.now, "parts": tl.parts, "calls": tl.calls, "replicated_layers": 0}


def fssdp_step(setup: StepSetup, layer_plans) -> dict:
    """Seconds of one fssdp step from the LayerPlans the replay made for it."""
    hw, node, multi = setup.hw, setup.node_of_W(), setup.multi_node
    opts = setup.fssdp_options
    remat, prefetch = opts.get("rematerialize", True), opts.get("prefetch", True)
    overlap_reduce = opts.get("overlap_reduce", True)
    row, chunk = setup.token_row_bytes(), setup.chunk_bytes()
    W, E = setup.world_size, setup.shape.num_experts
    counts_s = (hw.alpha_inter if multi else hw.alpha_intra) + (W - 1) * (E + 5) * 8 / (
        hw.bw_inter if multi else hw.bw_intra)
    layers = []
    for lp in layer_plans:
        tokens = token_traffic(lp.plan, node, row)
        gather = phase_time(chunk_traffic(lp.plan, node, chunk), hw, multi) if lp.replicated else 0.0
        layers.append({"a2a": phase_time(tokens, hw, multi), "expert": setup.expert_s(tokens.extra["served"]).max(),
                       "gather": gather, "prefetched": lp.prefetched, "replicated": lp.replicated,
                       "plan": lp.plan_s if setup.count_planning else 0.0})
    tl = _Timeline()
    blk = setup.dense_block_s()
    n_moe = len(setup.shape.moe_layers)
    host, host_replicated = framework_s(setup, "fssdp"), framework_s(setup, "fssdp.replicated")
    pending_gather, replicated_layers = None, 0
    for b, j in _blocks(setup):
        tl.run("dense", blk)
        if j is None:
            continue
        L = layers[j % len(layers)]
        tl.run("framework", host + (host_replicated if L["replicated"] else 0.0))
        replicated_layers += L["replicated"]
        tl.run("counts", counts_s, calls=1)
        tl.run("planning", L["plan"])
        if L["replicated"]:
            if pending_gather is not None and L["prefetched"]:
                tl.wait("exposed_gather", pending_gather)
            else:
                tl.run("exposed_gather", L["gather"], calls=1)
        pending_gather = None
        tl.run("all_to_all", 2 * L["a2a"], calls=2)
        tl.run("experts", L["expert"])
        if prefetch and j + 1 < n_moe:
            nxt = layers[(j + 1) % len(layers)]
            if nxt["prefetched"] and nxt["replicated"]:
                pending_gather = tl.issue(nxt["gather"])
    pending_regather, reduces = None, []
    for b, j in reversed(_blocks(setup)):
        tl.run("dense", 2 * blk)
        if j is None:
            continue
        L = layers[j % len(layers)]
        tl.run("all_to_all", L["a2a"], calls=1)  # combine backward
        if remat and L["replicated"]:
            if pending_regather is not None:
                tl.wait("exposed_regather", pending_regather)
            else:
                tl.run("exposed_regather", L["gather"], calls=1)
        pending_regather = None
        if prefetch and remat and j > 0:
            prev = layers[(j - 1) % len(layers)]
            if prev["replicated"]:
                pending_regather = tl.issue(prev["gather"])
        tl.run("experts", 2 * L["expert"])
        tl.run("all_to_all", L["a2a"], calls=1)  # dispatch backward
        if L["replicated"]:
            if overlap_reduce:
                reduces.append(tl.issue(L["gather"]))  # spRS mirrors spAG's bytes
            else:
                tl.run("exposed_reduce", L["gather"], calls=1)
    for end in reduces:
        tl.wait("exposed_reduce", end)
    _optimizer_and_dense_sync(tl, setup, "fssdp")
    return {"seconds": tl.now, "parts": tl.parts, "calls": tl.calls, "replicated_layers": replicated_layers}


def shard_group(setup: StepSetup) -> int:
    G = setup.hybrid_group or setup.ranks_per_node
    if setup.world_size % G:
        raise ValueError(f"fssdp_hybrid: shard group size {G} must divide the {setup.world_size} ranks")
    return G


def hybrid_step(setup: StepSetup, group_setup: StepSetup, layer_plans) -> dict:
    """fssdp_hybrid (hecate/parallel/fssdp/hybrid.py): FSSDP inside shard group 0 (its plans,
    its ranks' routing), then the owned rows' gradients all-reduced over the W / G replica
    groups, the dense gradients all-reduced over the world, AdamW on the dense parameters
    (replicated) and the rows a rank owns in its group."""
    r = fssdp_step(group_setup, layer_plans)
    parts = {k: v for k, v in r["parts"].items() if k not in ("dense_sync", "optimizer")}
    # the group's collectives less its dense sync (1 reduce-scatter + 1 all-gather)
    tl = _Timeline(now=sum(parts.values()), parts=parts, calls=r["calls"] - (2 if group_setup.world_size > 1 else 0))
    s, hw, W, G = setup.shape, setup.hw, setup.world_size, group_setup.world_size
    node = setup.node_of_W()
    k = W // G
    if k > 1:
        owned = s.routed_params / G * 4
        t = uniform_traffic_fast(2 * (k - 1) * owned / k, node)
        if G >= hw.ranks_per_node:  # replica peers sit in other nodes
            t = Traffic(np.zeros(W), t.send_intra + t.send_inter, np.zeros(W), t.recv_intra + t.recv_inter)
        tl.run("replica_all_reduce", phase_time(t, hw, setup.multi_node), calls=len(s.moe_layers))
        ring = 2 * (W - 1) * s.dense_params * 4 / W
        tl.run("dense_sync", phase_time(uniform_traffic_fast(ring, node), hw, setup.multi_node), calls=1)
    tl.run("optimizer", (s.dense_params + s.routed_params / G) / hw.adam_params_per_s)
    return {"seconds": tl.now, "parts": tl.parts, "calls": tl.calls, "replicated_layers": r["replicated_layers"]}


def planner_options(setup: StepSetup) -> dict:
    """The fssdp options the runtime planner gets in the replay: the user's, plus this hardware's
    figures where the runtime would take a default for its backend: link bandwidths, the expert
    seconds per token and (where the planner has the option) the collectives' latency alpha."""
    from hecate.parallel.fssdp.options import FssdpOptions

    o = dict(setup.fssdp_options)
    o.setdefault("bandwidth", (setup.hw.bw_intra, setup.hw.bw_inter))
    o.setdefault("token_compute_s", float(setup.expert_s(1)) * 3)
    if "collective_latency_s" in FssdpOptions.__dataclass_fields__:
        o.setdefault("collective_latency_s", setup.hw.alpha_inter if setup.multi_node else setup.hw.alpha_intra)
    return o


def _non_moe_s(setup: StepSetup) -> float:
    """Dense seconds per MoE layer (the non-MoE time the planner's overlap degree reads)."""
    return setup.dense_block_s() * setup.shape.n_layers / max(len(setup.shape.moe_layers), 1)


def replay_fssdp(setup: StepSetup, trace_steps) -> list:
    """Per step of `trace_steps`, the LayerPlans the runtime planner makes for it (FssdpReplay
    with planner_options). They depend on the routing, the options and the hardware's links,
    not on the step's timing, so several step models can share them."""
    replay = FssdpReplay(setup.world_size, setup.ranks_per_node, setup.shape.num_experts, setup.shape.chunk_numel,
                         len(trace_steps[0]), wire_bytes=setup.hw.wire_bytes, **planner_options(setup))
    return [replay.step(step, setup.token_row_bytes(), _non_moe_s(setup)) for step in trace_steps]


def simulate_steps(setup: StepSetup, trace_steps, strategies=STRATEGIES, warmup: int = 0,
                   fssdp_plans: list | None = None) -> dict:
    """Mean step seconds (and their parts, collectives issued and fssdp's replicated layers) of
    each strategy over `trace_steps` (per step, one [W, E] count matrix per simulated MoE layer;
    layers repeat cyclically over the model's MoE layers). The first `warmup` steps only feed
    fssdp's load history. `fssdp_plans`: replay_fssdp's plans for these steps, made once."""
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise ValueError(f"strategies {sorted(unknown)} are not simulated; use {STRATEGIES}")
    if len(trace_steps) <= warmup:
        raise ValueError(f"{len(trace_steps)} trace steps leave nothing after {warmup} warm-up steps")
    out = {name: {"seconds": 0.0, "parts": {}, "calls": 0.0, "replicated_layers": 0.0} for name in strategies}
    all_plans = None
    if "fssdp" in strategies:
        all_plans = fssdp_plans if fssdp_plans is not None else replay_fssdp(setup, trace_steps)
        if len(all_plans) != len(trace_steps):
            raise ValueError(f"fssdp_plans has {len(all_plans)} steps but the trace {len(trace_steps)}")
    group_setup = group_replay = None
    if "fssdp_hybrid" in strategies:
        G = shard_group(setup)
        group_setup = dataclasses.replace(setup, world_size=G)
        o = planner_options(group_setup)
        o["reshard_interval"] = 0
        group_replay = FssdpReplay(G, group_setup.ranks_per_node, setup.shape.num_experts, setup.shape.chunk_numel,
                                   len(trace_steps[0]), wire_bytes=setup.hw.wire_bytes, **o)
    measured = 0
    non_moe = _non_moe_s(setup)
    for i, step in enumerate(trace_steps):
        plans = all_plans[i] if all_plans is not None else None
        group_plans = None
        if group_replay is not None:  # shard group 0: its ranks' counts
            group_plans = group_replay.step([np.asarray(c)[:group_setup.world_size] for c in step],
                                            setup.token_row_bytes(), non_moe)
        if i < warmup:
            continue
        measured += 1
        for name in strategies:
            if name == "fssdp":
                r = fssdp_step(setup, plans)
            elif name == "fssdp_hybrid":
                r = hybrid_step(setup, group_setup, group_plans)
            elif name == "ep":
                r = ep_step(setup, step)
            else:
                r = fsdp_step(setup, step)
            out[name]["seconds"] += r["seconds"]
            out[name]["calls"] += r["calls"]
            out[name]["replicated_layers"] += r["replicated_layers"]
            for k, v in r["parts"].items():
                out[name]["parts"][k] = out[name]["parts"].get(k, 0.0) + v
    for name in strategies:
        for key in ("seconds", "calls", "replicated_layers"):
            out[name][key] /= measured
        out[name]["parts"] = {k: v / measured for k, v in out[name]["parts"].items()}
    return out
