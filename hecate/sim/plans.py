"""Per-layer plans of each strategy, made by the runtime's own code, without communication.

`FssdpReplay` runs `hecate.parallel.fssdp.FullyShardedSparse` itself on a layout-only
Topology (no process group): its `plan()` (policy, byte fitting, token routes), its
load predictors, its re-sharding (Algorithm 2). Only the collectives are replaced: the
all-gathered counts are given, and re-sharding moves no rows. The forward prefetch
(layer l+1's P1 fixed from predicted load at the end of layer l) is driven here in the
order the runtime's forward drives it, from the strategy's own `_policy` and
`_fit_holders`; tests/test_sim_bytes.py checks the result byte for byte against runs.

`ep_tokens_WW` is expert parallelism's exchange: tokens of expert e go to the rank
holding e's contiguous slice.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from hecate.comm.topology import Topology
from hecate.parallel.chunks import ChunkLayout
from hecate.parallel.fssdp.load import LoadPredictor
from hecate.parallel.fssdp.sharding import even_sharding
from hecate.parallel.fssdp.strategy import FullyShardedSparse, LayerState


class _PlanOnly(FullyShardedSparse):
    """The runtime strategy with its two collectives replaced (counts given, no row moves)."""

    injected = None  # (counts_WE int64 [W, E], non_moe_us)
    overlapped_s = 0.0  # planning the runtime does while the counts travel (off the critical path)

    def _agree_on_counts(self, layer, counts_E, meanwhile=None, fit=None):
        start = time.perf_counter()
        early = meanwhile() if meanwhile is not None else None
        self.overlapped_s = time.perf_counter() - start
        counts_WE, non_moe_us = self.injected
        bound = self._fit_bound(fit, counts_WE.numpy(), layer.fssdp_state) if fit is not None else None
        return counts_WE, non_moe_us, early, bound

    def _move_layer(self, layer, new_owner, optimizer) -> None:
        self.moved_chunks = getattr(self, "moved_chunks", 0) + int((layer.fssdp_state.owner_E != new_owner).sum())
        layer.fssdp_state.owner_E = new_owner


@dataclass
class LayerPlan:
    """What one MoE layer did in one step: the plan and whether its spAG was prefetched."""

    plan: object
    prefetched: bool
    replicated: bool
    plan_s: float = 0.0  # seconds this host spent planning the layer (policy, fit, routes, prefetch)


class FssdpReplay:
    """Plan every MoE layer of every step as rank 0 of the runtime would (all ranks agree).

    `options` are the strategy's (hecate.parallel.fssdp.options.FssdpOptions or keyword
    overrides); `wire_bytes` 2 makes replicas travel as bf16 (autocast), 4 as fp32 rows.
    """

    def __init__(self, world_size: int, ranks_per_node: int, num_experts: int, chunk_numel: int,
                 num_moe_layers: int, *, wire_bytes: int = 4, options=None, **overrides):
        topo = Topology(rank=0, world_size=world_size, ranks_per_node=ranks_per_node)
        self.strategy = _PlanOnly(topo, options, **overrides)
        self.strategy._wire = torch.bfloat16 if wire_bytes == 2 else None
        layout = ChunkLayout(("chunk",), ((chunk_numel,),), num_experts)
        self.layers = []
        for i in range(num_moe_layers):
            # The owner rotation of FullyShardedSparse.attach: layer i's even sharding shifted by
            # the chunks attached before it.
            owner_E = (even_sharding(num_experts, world_size) + i * num_experts) % world_size
            state = LayerState(owner_E, LoadPredictor(num_experts, self.strategy.window),
                               rank_history=deque(maxlen=self.strategy.window))
            self.layers.append(SimpleNamespace(expert_layout=layout, fssdp_state=state, layer_id=i))
        self.strategy.after_attach(self.layers)

    @property
    def node_of_W(self) -> torch.Tensor:
        return self.strategy.node_of_W

    def step(self, counts_LWE, token_bytes: int, non_moe_s=0.0) -> list[LayerPlan]:
        """One training step: every MoE layer's plan for its all-gathered counts [W, E]
        (in forward order), then the optimizer step's re-sharding check."""
        s = self.strategy
        non_moe = non_moe_s if isinstance(non_moe_s, (list, tuple)) else [non_moe_s] * len(self.layers)
        out = []
        s._token_bytes = token_bytes  # FullyShardedSparse.forward sets it from the tokens' dtype
        for layer, counts_WE, t in zip(self.layers, counts_LWE, non_moe):
            s.injected = (torch.as_tensor(counts_WE, dtype=torch.int64), int(t * 1e6))
            prefetched = layer.fssdp_state.prefetched is not None
            start = time.perf_counter()
            s.overlapped_s = 0.0
            plan = s.plan(layer, None, token_bytes)
            layer.fssdp_state.prefetched = None
            E = layer.expert_layout.num_experts
            lp = LayerPlan(plan, prefetched, bool(plan.holders_WE.sum() > E))
            nxt = s._next_layer(layer)
            if nxt is not None:
                self._prefetch(nxt, token_bytes)
            lp.plan_s = time.perf_counter() - start - s.overlapped_s
            out.append(lp)
        s.step_end(self.layers)
        return out

    def _prefetch(self, layer, token_bytes: int) -> None:
        """FullyShardedSparse._issue_prefetch without the transfer: fix the layer's P1 now."""
        s, state = self.strategy, layer.fssdp_state
        if not state.rank_history:
            return
        E = layer.expert_layout.num_experts
        policy = s._policy(layer.expert_layout, state.non_moe_agreed_s, s.topology.num_nodes > 1)
        holders = policy.plan(state.predictor.predict(), state.owner_E, s.node_of_W, s.capacity_m(E))
        if s.fit_replicas:
            predicted_WE = torch.stack(list(state.rank_history)).mean(0)
            holders = s._fit_holders(holders, state.owner_E, predicted_WE, layer.expert_layout, token_bytes)
        if int(holders.sum()) == E:
            return
        state.prefetched = SimpleNamespace(holders_WE=holders)


def ep_owner_E(num_experts: int, ep_size: int) -> np.ndarray:
    """Rank (inside the EP group) of each expert under ep: contiguous slices."""
    if num_experts % ep_size:
        raise ValueError(f"ep needs num_experts ({num_experts}) divisible by the EP size ({ep_size})")
    return np.arange(num_experts) // (num_experts // ep_size)


def ep_tokens_WW(counts_WE, ep_size: int | None = None) -> np.ndarray:
    """[W_src, W_dst] tokens of ep's dispatch: each rank sends its entries of expert e to the
    member of its EP group owning e (EP groups are blocks of ep_size consecutive ranks)."""
    counts_WE = np.asarray(counts_WE, dtype=np.int64)
    W, E = counts_WE.shape
    ep = W if ep_size is None else ep_size
    owner = ep_owner_E(E, ep)
    per_member = np.zeros((W, ep), dtype=np.int64)
    np.add.at(per_member.T, owner, counts_WE.T)
    out = np.zeros((W, W), dtype=np.int64)
    for src in range(W):
        base = (src // ep) * ep
        out[src, base:base + ep] = per_member[src]
    return out


def fssdp_tokens_WW(plan) -> np.ndarray:
    """[W_src, W_dst] tokens of fssdp's dispatch for a Plan (dense; for W up to a few hundred)."""
    W = plan.holders_WE.shape[0]
    out = np.zeros((W, W), dtype=np.int64)
    for r in range(W):
        send_WE, _ = plan.rank_splits(r)
        out[r] = np.asarray(send_WE).sum(1)
    return out


@dataclass
class Traffic:
    """Per-rank bytes of one collective phase split by link class ([W] arrays)."""

    send_intra: np.ndarray
    send_inter: np.ndarray
    recv_intra: np.ndarray
    recv_inter: np.ndarray
    calls: int = 1
    extra: dict = field(default_factory=dict)

    def scaled(self, k: float) -> "Traffic":
        return Traffic(self.send_intra * k, self.send_inter * k, self.recv_intra * k, self.recv_inter * k,
                       self.calls)


def traffic_of_WW(bytes_WW: np.ndarray, node_of_W: np.ndarray) -> Traffic:
    """Split a [src, dst] byte matrix into per-rank intra / inter send and receive."""
    b = np.asarray(bytes_WW, dtype=np.float64).copy()
    np.fill_diagonal(b, 0.0)
    same = node_of_W[:, None] == node_of_W[None, :]
    intra, inter = np.where(same, b, 0.0), np.where(same, 0.0, b)
    return Traffic(intra.sum(1), inter.sum(1), intra.sum(0), inter.sum(0))


def uniform_traffic(total_per_rank: float, node_of_W: np.ndarray, ranks_per_group: int | None = None) -> Traffic:
    """A collective whose bytes per rank spread evenly over the other ranks of its group."""
    W = len(node_of_W)
    g = W if ranks_per_group is None else ranks_per_group
    per_peer = total_per_rank / max(g - 1, 1)
    inter_W = np.zeros(W)
    for r in range(W):
        base = (r // g) * g
        inter_W[r] = sum(node_of_W[p] != node_of_W[r] for p in range(base, base + g) if p != r)
    inter = per_peer * inter_W
    intra = total_per_rank - inter
    return Traffic(intra, inter, intra.copy(), inter.copy())


def uniform_traffic_fast(total_per_rank: float, node_of_W: np.ndarray) -> Traffic:
    """uniform_traffic over the whole world in O(W) (nodes of equal size)."""
    W = len(node_of_W)
    rpn = int(np.sum(node_of_W == node_of_W[0]))
    inter = total_per_rank * (W - rpn) / max(W - 1, 1)
    intra = total_per_rank - inter
    return Traffic(np.full(W, intra), np.full(W, inter), np.full(W, intra), np.full(W, inter))


def chunk_traffic(plan, node_of_W: np.ndarray, chunk_bytes: float) -> Traffic:
    """spAG of a plan's replicas (spRS is its mirror): owners send, holders receive."""
    holders = np.asarray(plan.holders_WE, dtype=bool)
    owner = np.asarray(plan.owner_E, dtype=np.int64)
    W, E = holders.shape
    gather = holders.copy()
    gather[owner, np.arange(E)] = False
    same = node_of_W[:, None] == node_of_W[owner][None, :]  # [W, E]: holder on the owner's node
    recv_intra = (gather & same).sum(1) * chunk_bytes
    recv_inter = (gather & ~same).sum(1) * chunk_bytes
    send_intra, send_inter = np.zeros(W), np.zeros(W)
    np.add.at(send_intra, owner, (gather & same).sum(0) * chunk_bytes)
    np.add.at(send_inter, owner, (gather & ~same).sum(0) * chunk_bytes)
    return Traffic(send_intra, send_inter, recv_intra.astype(np.float64), recv_inter.astype(np.float64))


def token_traffic(plan, node_of_W: np.ndarray, token_bytes: float) -> Traffic:
    """fssdp dispatch traffic of a plan, from its routes' per-rank loads (O(W*E + replicas)
    with routes.TokenRoutes), else from the dense [W, E, W] routes."""
    routes = getattr(plan, "routes", None)
    if routes is not None and hasattr(routes, "rank_loads"):
        loads = routes.rank_loads()
        t = Traffic(*(np.asarray(loads[k], dtype=np.float64) * token_bytes
                      for k in ("send_intra", "send_inter", "recv_intra", "recv_inter")))
        t.extra["served"] = np.asarray(loads["served"], dtype=np.float64)
        return t
    routes_WEW = np.asarray(plan.routes_WEW)
    t = traffic_of_WW(routes_WEW.sum(1) * token_bytes, node_of_W)
    t.extra["served"] = routes_WEW.sum(axis=(0, 1)).astype(np.float64)
    return t
