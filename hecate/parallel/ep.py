"""`ep`: expert parallelism (DeepSpeed-MoE style).

The experts are split over an expert-parallel (EP) group of `ep_size`
consecutive ranks: rank i of the group holds experts [i*E/ep, (i+1)*E/ep).
Tokens travel to their expert's rank with an all-to-all-v and back with the
mirror exchange. When the world is larger than ep_size, the EP groups are
replicated over expert-data-parallel (EDP) groups that average the expert
gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hecate import ops
from hecate.comm.all_to_all import all_reduce_coalesced, all_to_all_v, comm_device
from hecate.parallel.chunks import ChunkLayout, mark_expert
from hecate.parallel.expert_compute import experts_on_received, recomputed
from hecate.parallel.strategy import ExpertStrategy


class _DispatchInGraph(torch.autograd.Function):
    """y_recv unchanged, with x_recv as an input whose gradient is None (nothing to add).

    Autograd runs the dispatch's backward all-to-all only when x_recv is in the graph of the
    loss. An expert module whose output skips its input on some rank only (a data-dependent
    branch on its rows, say) would make that rank skip the collective and meet its peers in
    the next one; with this edge every rank runs it (None arrives there as zeros)."""

    @staticmethod
    def forward(ctx, y_recv, x_recv):
        return y_recv.view_as(y_recv)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, None


class ExpertParallel(ExpertStrategy):
    name = "ep"

    def __init__(self, topology, ep_size: int | None = None):
        self.topology = topology
        self.ep_size = topology.world_size if ep_size is None else ep_size
        self.groups = topology.expert_groups(self.ep_size)  # validates ep_size against the world

    def attach(self, layer) -> None:
        E = layer.config.num_experts
        if E % self.ep_size:
            raise ValueError(f"moe.num_experts={E} must be divisible by parallel.ep_size={self.ep_size} "
                             "(each EP rank holds the same number of experts)")
        local = E // self.ep_size
        first = self.groups.ep_rank * local
        layout = ChunkLayout.of(layer.experts)
        for n in layout.names:
            full = getattr(layer.experts, n)
            setattr(layer.experts, n, mark_expert(nn.Parameter(full.detach()[first:first + local].clone())))
        layer.experts.num_experts = local
        layer.expert_slice = (first, local)

    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        E = layer.config.num_experts
        ep, local = self.ep_size, E // self.ep_size
        group, stats = self.groups.ep_group, self.topology.stats
        # Each peer learns how many rows it gets for each of its experts. The counts are counted
        # where the indices are; sent and received counts come back to the host in one read (on a
        # GPU every read stalls the host until the stream catches up), and the permute is told its
        # row count, so it reads nothing back itself.
        send_counts = ops.expert_histogram(routing.indices_TK, E).to(comm_device(group))
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        if stats is not None:  # every peer's `local` counts cross; the own slice stays
            crossing = (ep - 1) * local * send_counts.element_size()
            stats.record("ep.counts", crossing, crossing, ranks=self.groups.ep_ranks)
        counts = torch.cat([send_counts, recv_counts]).cpu()
        send_PG, recv_counts_PG = counts[:E].view(ep, local), counts[E:].view(ep, local)
        send_splits = send_PG.sum(1).tolist()
        recv_splits = recv_counts_PG.sum(1).tolist()
        x_ND, row_map_TK, _ = ops.permute(x_TD, routing.indices_TK, E, -1, num_rows=sum(send_splits))
        x_recv = all_to_all_v(x_ND, send_splits, recv_splits, group=group, stats=stats, name="ep.dispatch")
        weights = {n: getattr(layer.experts, n) for n in ChunkLayout.of(layer.experts).names}
        # Local compute only (the all-to-alls stay outside): recomputed under activation checkpointing.
        y_recv = recomputed(layer, lambda x: experts_on_received(layer, x, recv_counts_PG, weights), x_recv)
        y_recv = _DispatchInGraph.apply(y_recv, x_recv)
        y_ND = all_to_all_v(y_recv, recv_splits, send_splits, group=group, stats=stats, name="ep.combine")
        return ops.unpermute(y_ND, row_map_TK, routing.weights_TK)

    def expert_replication(self) -> int:
        return len(self.groups.edp_ranks)

    def finish_backward(self, layers) -> None:
        """Expert grads hold the sum over every rank's tokens; average them like dense DP grads."""
        world = self.topology.world_size
        edp, k = self.groups.edp_group, len(self.groups.edp_ranks)
        for layer in layers:
            grads = []
            for p in layer.experts.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            if k > 1:  # one all-reduce per layer, not one per parameter
                all_reduce_coalesced(grads, group=edp, stats=self.topology.stats, name="ep.edp_all_reduce",
                                     ranks=self.groups.edp_ranks)
            for g in grads:
                g /= world

    def gather_experts(self, layer, grads: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for n in ChunkLayout.of(layer.experts).names:
            p = getattr(layer.experts, n)
            src = (p.grad if grads else p.detach()).contiguous()
            parts = [torch.empty_like(src) for _ in range(self.ep_size)]
            dist.all_gather(parts, src, group=self.groups.ep_group)
            out[n] = torch.cat(parts)
        return out

    @torch.no_grad()
    def load_experts(self, layer, full: dict[str, torch.Tensor]) -> None:
        first, local = layer.expert_slice
        for n in ChunkLayout.of(layer.experts).names:
            getattr(layer.experts, n).copy_(full[n][first:first + local])
