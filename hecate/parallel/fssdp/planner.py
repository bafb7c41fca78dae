"""One MoE layer's per-step plan on one rank, in one call: what FullyShardedSparse.plan runs.

    plan_layer(counts_WE, owner_E, node_of_W, rank, capacity_m=m, load_E=..., overlap_degree=t,
               fit=ReplicaFit(...), sparse=True) -> LayerPlan

does, in order: check the all-gathered counts and sum them per expert (the load predictor's
next input) -> P1 (Algorithm 1 on `load_E` with overlap degree t, or the caller's `holders_WE`:
an early, prefetched or other policy's P1) -> P1 fitted to bytes (`fit`) -> the token routes
with this rank's layout -> this rank's spAG / spRS plan when P1 has replicas (`sparse`).

With hecate._C built it is one C++ op (csrc/cpu/plan_layer.cpp) running the code of the staged
ops (place_experts, fit_replicas, route_layout, sparse_plan); without it, the staged Python
functions (HecatePolicy.place, fit_holders, route_tokens, plan_sparse). Both give the same plan
bit for bit (tests/test_fssdp_planner_fused.py), so ranks with and without the extension agree.

The inputs are the runtime's own, checked once where they are made (the owners at attach and
re-shard, the node map at construction, the counts' shape by the all-gather): here only what
the plan's correctness needs per step is checked (counts non-negative, owners and nodes in
range), in the same pass that reads them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from hecate.comm.sparse import SparsePlan, plan_sparse
from hecate.ops._backend import use_extension
from hecate.parallel.fssdp._checks import node_array
from hecate.parallel.fssdp.materialize import HecatePolicy, fit_holders
from hecate.parallel.fssdp.plan import Plan
from hecate.parallel.fssdp.routes import RankLayout, TokenRoutes, route_tokens


_CPU = torch.device("cpu")
_OP = []  # torch.ops.hecate.plan_layer.default, looked up once (the overload call skips the packet's resolution)


def _op():
    if not _OP:
        _OP.append(torch.ops.hecate.plan_layer.default)
    return _OP[0]


@dataclass(frozen=True)
class ReplicaFit:
    """materialize.fit_holders' byte prices: a chunk crosses `chunk_passes` times, a token 4
    times; `fixed_bytes` is what the replicas' collectives cost beyond their bytes."""

    chunk_bytes: int
    token_bytes: int
    chunk_passes: int
    fixed_bytes: float = 0.0


@dataclass(frozen=True)
class LayerPlan:
    """plan: the Plan (its routes carry `rank`'s layout, made in the same call); counts_E: int64
    [E] tokens per expert over all ranks (checked non-negative); sparse: `rank`'s SparsePlan
    (host tensors) when asked for and P1 has replicas, else None."""

    plan: Plan
    counts_E: torch.Tensor
    sparse: SparsePlan | None


def plan_layer(counts_WE: torch.Tensor, owner_E: torch.Tensor, node_of_W: torch.Tensor, rank: int, *,
               capacity_m: int, load_E: torch.Tensor | None = None, overlap_degree: int | None = None,
               holders_WE: torch.Tensor | None = None, fit: ReplicaFit | None = None, sparse: bool = False,
               history_out: torch.Tensor | None = None, use_kernel: bool | None = None) -> LayerPlan:
    """The layer's plan for this step's all-gathered `counts_WE` (int64 [W, E], CPU).

    P1 is `holders_WE` (bool [W, E]) when given, else Algorithm 1 (HecatePolicy.place) on
    `load_E` (float64 [E]) with `overlap_degree`; `fit` then fits it to bytes. `owner_E` int64
    [E], `node_of_W` int64 [W] (validated here once per tensor: a cached check). The plan keeps
    `counts_WE` (no copy): do not modify it while the plan is in use. `history_out` (float64
    [W, E], optional) receives a float64 copy of the counts, written in the same pass.
    """
    W, E = counts_WE.shape
    nodes = node_array(node_of_W)  # cached per tensor: the runtime passes the same one every step
    if use_kernel is None:
        use_kernel = use_extension("plan_layer", _CPU)
    if holders_WE is None and (load_E is None or overlap_degree is None):
        raise ValueError("plan_layer needs holders_WE (P1), or load_E and overlap_degree to place it")
    if use_kernel:
        cost, token_bytes, fixed = ((fit.chunk_passes * fit.chunk_bytes, fit.token_bytes, float(fit.fixed_bytes))
                                    if fit is not None else (0, 0, 0.0))
        (holders, H, counts_E, owner, send_e, send_dst, send_tokens, recv_WE, send_splits, recv_splits, sp,
         sp_send_counts, sp_recv_counts) = _op()(
            counts_WE, owner_E, node_of_W, load_E, holders_WE, int(capacity_m), int(overlap_degree or 0),
            fit is not None, int(cost), int(token_bytes), fixed, int(rank), bool(sparse), history_out)
        # The sends stay tensors too: the destination bins' op reads them (RankLayout.sends).
        layout = RankLayout(int(rank), send_e.numpy(), send_dst.numpy(), send_tokens.numpy(), recv_WE.numpy(),
                            send_splits, recv_splits, sends=(send_e, send_dst, send_tokens))
        routes = TokenRoutes.from_layout(holders, counts_WE, node_of_W, H, layout)
        sparse_plan = None
        if sp:
            send_ids, recv_ids, owned_ids, held_ids, send_rows, recv_rows, owned_rows_M = sp
            sparse_plan = SparsePlan(rank=int(rank), world_size=W, num_chunks=E, send_counts=sp_send_counts,
                                     recv_counts=sp_recv_counts, send_ids=send_ids, recv_ids=recv_ids,
                                     owned_ids=owned_ids, held_ids=held_ids, send_rows=send_rows,
                                     recv_rows=recv_rows, owned_rows_M=owned_rows_M)
        return LayerPlan(Plan(owner, holders, routes), counts_E, sparse_plan)  # owner: the op's copy of owner_E
    # The staged functions, one after another (the plan the C++ op reproduces).
    counts = counts_WE.numpy()
    if counts.size and counts.min() < 0:
        raise ValueError(f"counts_WE must be non-negative, found {counts.min()}")
    counts_E = torch.from_numpy(counts.sum(axis=0))
    if history_out is not None:
        history_out.copy_(counts_WE)
    holders = holders_WE
    if holders is None:
        holders = torch.from_numpy(HecatePolicy.place(load_E.numpy(), owner_E.numpy(), nodes, int(capacity_m),
                                                      int(overlap_degree), use_kernel=False))
    if fit is not None:
        holders = fit_holders(holders, owner_E, counts_WE, chunk_bytes=fit.chunk_bytes,
                              token_bytes=fit.token_bytes, chunk_passes=fit.chunk_passes,
                              capacity_m=int(capacity_m), fixed_bytes=fit.fixed_bytes, use_kernel=False)
    routes = route_tokens(holders, counts_WE, node_of_W, rank=rank)
    plan = Plan(owner_E.clone(), holders, routes)
    sparse_plan = plan_sparse(owner_E, holders, int(rank)) if sparse and plan.num_replicas else None
    return LayerPlan(plan, counts_E, sparse_plan)


def history_buffer(history: deque, counts_WE: torch.Tensor) -> torch.Tensor:
    """A float64 [W, E] buffer for this step's entry of a layer's rank_history (plan_layer's
    `history_out`): the entry the append will evict when the window is full, so no 2 MiB
    buffer is allocated per layer and step at W=1024, E=256. Callers append the result."""
    if history.maxlen and len(history) == history.maxlen:
        oldest = history[0]
        if oldest.shape == counts_WE.shape and oldest.dtype == torch.float64 and oldest.is_contiguous():
            return oldest
    return torch.empty(counts_WE.shape, dtype=torch.float64)
