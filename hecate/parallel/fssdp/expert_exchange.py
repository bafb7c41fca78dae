"""The autograd function that runs one FSSDP MoE layer's experts.

Everything that communicates inside the expert part of a layer lives in ONE
autograd node, so the order of collectives in the backward is fixed by code,
not by the autograd engine's scheduling (two independent collectives in one
graph may run in a different order on different ranks, for example on a rank
that received no tokens, and deadlock):

    forward:  spAG(P0 -> P1)  ->  dispatch all-to-all  ->  experts  ->  combine all-to-all
    backward: combine^T all-to-all -> [re-materialize: spAG again] -> experts backward
              -> dispatch^T all-to-all -> spRS(P1 -> P0)

A rank computes with the rows it owns in place and with the replicas it receives,
as two blocks of expert slots (owned ascending, then replicas in arrival order): no
[M, S] copy of owned and received rows is ever made, and the gradient of the owned
rows never travels. Re-materialization (RM) frees the received replicas right after
the forward (their storage is resized to zero while the autograd graph keeps its
views) and gathers them again at the start of the backward, so at most one layer's
replicas are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import get_gradient_edge

from hecate.comm.all_to_all import exchange_rows, group_ranks
from hecate.comm.sparse import SparsePlan
from hecate.moe.experts import autocast_dtype
from hecate.parallel.expert_compute import experts_on_received
from hecate.parallel.fssdp.clock import timed
from hecate.parallel.fssdp.overlap import PendingGather, PendingReduce


@dataclass(kw_only=True, eq=False)
class ExchangeSpec:
    """What one layer's exchange needs besides tensors (plan, layer, groups, options).

    Two process groups over the same ranks (from the Topology): `token_group` carries the
    token all-to-alls, `weight_group` the weight gathers (spAG, prefetch, re-gather) and
    gradient reduces (spRS), so that on NCCL each has its own stream and a weight gather
    issued early never queues in front of a token exchange (or behind one). None is the
    default (world) group.
    """

    layer: Any
    owner_E: torch.Tensor
    holders_WE: torch.Tensor
    send_splits: list
    recv_splits: list
    recv_WE: torch.Tensor
    slot_of_E: torch.Tensor
    rank: int
    rematerialize: bool
    # Holders beyond the owners (Plan.num_replicas, known to the plan without a pass over P1).
    num_replicas: int
    token_group: Any = None
    weight_group: Any = None
    stats: Any = None
    # The queue of asynchronous spRS (overlap on: overlap.ReduceQueue), or None for a blocking spRS.
    pending: Any = None
    timings: dict = field(default_factory=lambda: {"blocking_reduce_s": 0.0})
    sparse_plan: SparsePlan | None = None
    # Under autocast the experts only ever use a bf16 (fp16) cast of the rows, so replicas
    # travel in that dtype and so do their gradients: half the bytes, the same numbers.
    wire_dtype: torch.dtype | None = None
    # Set after construction: a PendingGather of exactly these holders, or None; backward
    # prefetch: the previous MoE layer's spec (same forward pass), whose re-gather this
    # layer's backward issues early, and this layer's own early re-gather.
    prefetched: Any = None
    previous: Any = None
    pending_regather: Any = None
    saved_owned: torch.Tensor | None = None
    replicas: torch.Tensor | None = None  # the forward's replicas (storage freed under RM)
    # Activation checkpointing (hecate.models.checkpointing): the forward keeps no expert graph,
    # only the received tokens; backward rebuilds it from them, the owned rows and the replicas
    # it holds anyway (re-gathered under RM), under the forward's autocast dtype.
    recompute_experts: bool = False
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        # P1 == P0 (no replica anywhere, e.g. every replica pruned): every rank computes with
        # exactly its own rows, so spAG, re-materialization and spRS have nothing to move and
        # are skipped (the same decision on every rank: the plan is agreed).
        self.replicated = self.num_replicas > 0
        if self.replicated and self.sparse_plan is None:
            raise ValueError("a plan with replicas needs its sparse_plan (hecate.comm.sparse.plan_sparse)")
        self.rematerialize = self.rematerialize and self.replicated
        self._token_ranks = None  # (rank in token_group, its global ranks), read at the first exchange

    def exchange_tokens(self, x: torch.Tensor, send: list, recv: list, name: str) -> torch.Tensor:
        """One of the node's four token all-to-alls (rows to peers by `send`, from them by
        `recv`). They run inside the node's forward and backward, where nothing is
        differentiated, with the plan's splits (one per rank, summing to the rows the plan
        routes): hecate.comm.all_to_all_v's argument checks and autograd wrapper, paid per call,
        buy nothing here, so it calls the exchange under it (exchange_rows)."""
        if x.shape[0] != sum(send):
            raise RuntimeError(f"fssdp {name}: {x.shape[0]} rows for splits {send} (sum {sum(send)}); "
                               "the plan's splits must cover the rows exactly")
        if self._token_ranks is None:
            self._token_ranks = (dist.get_rank(self.token_group), group_ranks(self.token_group))
        return exchange_rows(x, send, recv, self.token_group, self.stats, name, peers=self._token_ranks)

    def start_gather(self, owned_OS: torch.Tensor, async_op: bool = True,
                     out: torch.Tensor | None = None) -> PendingGather:
        return PendingGather(owned_OS, self.sparse_plan, self.holders_WE, self.weight_group, self.stats,
                             async_op=async_op, wire_dtype=self.wire_dtype, out=out)

    def regrow_replicas(self) -> torch.Tensor:
        """Re-grow the storage re-materialization freed after the forward and return the
        buffer to receive the re-gather into: the rows land where the graph's views of the
        replicas look, with no second [R, S] buffer alive beside them. (`.data`: writing it
        does not bump the version counter that the graph's saved views check.)"""
        r = self.replicas
        r.untyped_storage().resize_(r.numel() * r.element_size())
        return r.data

    def gather(self, owned_OS: torch.Tensor) -> torch.Tensor:
        """The replicas this rank holds but does not own, [R, S] (empty without replicas)."""
        if not self.replicated:
            return owned_OS.new_empty((0, owned_OS.shape[1]), dtype=self.wire_dtype or owned_OS.dtype)
        return self.start_gather(owned_OS, async_op=False).wait()[0]

    def expert_graph(self, x_recv: torch.Tensor, owned_OS: torch.Tensor, replicas_RS: torch.Tensor,
                     grad: bool = True):
        """Build the expert computation on its own inputs so its backward can be run on demand
        (grad=False: compute the outputs only, keeping no graph). Returns (tokens, owned
        leaves, replica leaves, outputs).

        The weights' leaves are the per-parameter views of the owned rows and of the replicas
        (no copy); their gradients are flattened back into rows in backward. The tokens enter
        through `_TokensIn` (not as a leaf), so the graph does not keep their buffer alive.
        """
        layout = self.layer.expert_layout
        own = owned_leaves(self.layer, owned_OS) if grad and isinstance(owned_OS, torch.nn.Parameter) else \
            {n: t.detach().requires_grad_(grad) for n, t in layout.unflatten(owned_OS.detach()).items()}
        # Without replicas anywhere (ep's path) there is no replica block: no empty leaves to
        # build, differentiate and flatten back every layer.
        rep = {n: t.detach().requires_grad_(grad) for n, t in layout.unflatten(replicas_RS).items()} \
            if self.replicated else {}
        autocast = autocast_dtype(x_recv.device.type) is not None
        with torch.set_grad_enabled(grad):
            x_leaf = _TokensIn.apply(x_recv.new_empty(0).requires_grad_(), x_recv.detach()) if grad \
                else x_recv.detach()
            # Under autocast the grouped MLP casts every weight to the compute dtype itself (the
            # replicas arrive in it already). Without autocast, tokens in a dtype other than the
            # fp32 master rows' (a bf16 model) set it; the cast's backward returns fp32 grads.
            def used(ws):
                return {n: (t if autocast or t.dtype == x_leaf.dtype else t.to(x_leaf.dtype))
                        for n, t in ws.items()}

            blocks = [used(own), used(rep)] if rep else [used(own)]
            y = experts_on_received(self.layer, x_leaf, self.recv_WE, blocks, self.slot_of_E)
        return x_leaf, own, rep, y


def owned_leaves(layer, owned_OS: torch.nn.Parameter) -> dict:
    """The per-parameter leaves of the owned rows (views of them, requiring grad), kept on the
    layer for as long as its rows are this Parameter and storage (re-sharding replaces it and
    drops them):
    not 2-3 slices, reshapes, detaches and a layout check per parameter every forward. They
    share the rows' storage and version counter, so every forward sees the stepped weights
    and saves them at their current version; nothing accumulates in them (backward asks
    autograd.grad for their gradients)."""
    # `.data` replaced (a dtype or device move): new views. Rows of a rank owning no expert
    # have data_ptr 0 on every device, so the device and dtype are part of the key too.
    key = (owned_OS.data_ptr(), owned_OS.shape, owned_OS.dtype, owned_OS.device)
    cached = getattr(layer, "fssdp_owned_leaves", None)
    if cached is None or cached[0] is not owned_OS or cached[1] != key:
        leaves = {n: t.detach().requires_grad_()
                  for n, t in layer.expert_layout.unflatten(owned_OS.detach()).items()}
        cached = layer.fssdp_owned_leaves = (owned_OS, key, leaves)
    return cached[2]


class _TokensIn(torch.autograd.Function):
    """The received tokens as a non-leaf input of the expert graph (an alias of `x`, made to
    require grad by the empty `anchor` leaf). A leaf would be held, storage and all, by its
    gradient accumulator for as long as the graph lives, i.e. until backward: one [N, D]
    token buffer per layer more than ep, whose tokens enter its expert graph as the output of
    its all-to-all. This node saves nothing: the buffer lives only as long as something the
    graph saved needs it (the permute keeps just its row map). Backward asks for the tokens'
    gradient at this node's edge (`torch.autograd.graph.get_gradient_edge`), so this backward
    is not run; it is the identity for anyone who does run it."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _edges(x_in: torch.Tensor, y: torch.Tensor):
    """(tokens' edge, outputs' edge) of an expert graph, or None when it has nothing to
    differentiate. Holding edges, not the outputs themselves, lets the outputs' buffer go once
    the combine all-to-all has copied it (ep frees it then too)."""
    if not (y.requires_grad and y.numel()):
        return None
    return get_gradient_edge(x_in), get_gradient_edge(y)


def _rows(layout, leaves: dict, grads) -> torch.Tensor:
    """Gradients of per-parameter leaves -> [M, S] rows (zeros for a leaf that got none)."""
    return layout.flatten({n: torch.zeros_like(t) if g is None else g
                           for (n, t), g in zip(leaves.items(), grads)})


class FssdpExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, owned_OS, spec: ExchangeSpec):
        with torch.no_grad():
            # Timings on the device's clock (CUDA events, read when done; host clock on CPU).
            if spec.prefetched is not None:  # gathered while the block's attention computed
                with timed(spec.timings, "exposed_gather_s", owned_OS.device) as interval:
                    replicas, interval.host_seconds = spec.prefetched.wait()
                spec.timings["prefetched_layers"] = spec.timings.get("prefetched_layers", 0) + 1
                spec.prefetched = None
            elif not spec.replicated:  # ep's path (P1 == P0): nothing to gather or to time
                replicas = spec.gather(owned_OS)
            else:
                with timed(spec.timings, "blocking_gather_s", owned_OS.device):
                    replicas = spec.gather(owned_OS)
        x_recv = spec.exchange_tokens(x_ND.detach(), spec.send_splits, spec.recv_splits, "fssdp.dispatch")
        if spec.recompute_experts:
            spec.autocast = autocast_dtype(x_recv.device.type)
            y_recv = spec.expert_graph(x_recv, owned_OS, replicas, grad=False)[3]
            tokens, own, rep, edges = x_recv, None, None, None  # backward rebuilds the graph from these
        else:
            x_in, own, rep, y_recv = spec.expert_graph(x_recv, owned_OS, replicas)
            tokens, edges = None, _edges(x_in, y_recv)
            del x_in
        ctx.x_meta = (x_recv.shape, x_recv.dtype, x_recv.device)
        del x_recv
        y_ND = spec.exchange_tokens(y_recv.detach(), spec.recv_splits, spec.send_splits, "fssdp.combine")
        del y_recv  # the graph holds its edge, not its buffer
        if spec.rematerialize:
            # Free the replicas now; the graph's views of them come back to life in backward.
            replicas.untyped_storage().resize_(0)
        ctx.spec = spec
        ctx.graph = (tokens, own, rep, edges, replicas)
        spec.saved_owned = owned_OS.detach()  # the owner's rows persist anyway: no extra memory
        spec.replicas = replicas if spec.rematerialize else None
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND):
        spec = ctx.spec
        if spec.pending is not None:
            spec.pending.reap()  # free the buffers of later layers' finished spRS before allocating
        tokens, own, rep, edges, replicas = ctx.graph
        layout = spec.layer.expert_layout
        grad_y_recv = spec.exchange_tokens(grad_y_ND, spec.send_splits, spec.recv_splits,
                                           "fssdp.combine.backward")
        if spec.rematerialize:
            # The re-gather receives into the replicas' re-grown storage (regrow_replicas).
            early = spec.pending_regather is not None  # issued by the next layer's backward
            key = "exposed_regather_s" if early else "blocking_regather_s"
            with timed(spec.timings, key, spec.saved_owned.device):
                if early:
                    spec.pending_regather.wait()
                    spec.pending_regather = None
                else:
                    spec.start_gather(spec.saved_owned, async_op=False, out=spec.regrow_replicas()).wait()
        prev = spec.previous
        if prev is not None and prev.rematerialize and prev.pending_regather is None:
            # Start the previous layer's re-gather now, behind this layer's expert backward.
            prev.pending_regather = prev.start_gather(prev.saved_owned, out=prev.regrow_replicas())
        spec.previous = None
        if spec.recompute_experts:  # the received tokens were kept; replicas are current again
            with torch.autocast(tokens.device.type, dtype=spec.autocast, enabled=spec.autocast is not None):
                x_in, own, rep, y_recv = spec.expert_graph(tokens, spec.saved_owned, replicas)
            edges = _edges(x_in, y_recv)
            del tokens, x_in, y_recv
        weights = [*own.values(), *rep.values()]
        if edges is not None:
            x_edge, y_edge = edges
            grads = torch.autograd.grad([y_edge], [x_edge, *weights], [grad_y_recv], allow_unused=True)
        else:
            grads = [None] * (1 + len(weights))
        del edges, grad_y_recv  # consumed: ep's autograd engine frees it here too
        shape, dtype, device = ctx.x_meta
        grad_x = torch.zeros(shape, dtype=dtype, device=device) if grads[0] is None else grads[0]
        grad_owned = _rows(layout, own, grads[1:1 + len(own)])
        grad_replicas = _rows(layout, rep, grads[1 + len(own):]) if spec.replicated else None
        # The per-parameter gradients are copied into rows: free them before the dispatch
        # backward and the spRS allocate their buffers.
        del grads, weights
        if spec.rematerialize:
            replicas.untyped_storage().resize_(0)
        ctx.graph = None
        grad_x_ND = spec.exchange_tokens(grad_x, spec.recv_splits, spec.send_splits, "fssdp.dispatch.backward")
        if not spec.replicated:
            return grad_x_ND, grad_owned, None
        if spec.pending is not None:
            # The other holders' rows arrive asynchronously; the queue adds the sum (by the end
            # of this backward pass at the latest: overlap.ReduceQueue).
            spec.pending.add(PendingReduce(spec.layer, grad_replicas, grad_owned, spec.sparse_plan,
                                           spec.weight_group, spec.stats))
            return grad_x_ND, None, None
        with timed(spec.timings, "blocking_reduce_s", grad_owned.device):
            grad_owned, _ = PendingReduce(spec.layer, grad_replicas, grad_owned, spec.sparse_plan,
                                          spec.weight_group, spec.stats, async_op=False).wait()
        return grad_x_ND, grad_owned, None


def fssdp_experts(x_ND: torch.Tensor, owned_OS: torch.Tensor, spec: ExchangeSpec) -> torch.Tensor:
    """Rows of x_ND (ordered by destination rank, then expert) -> expert outputs in the same order."""
    return FssdpExperts.apply(x_ND, owned_OS, spec)
