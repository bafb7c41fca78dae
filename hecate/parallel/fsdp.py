"""`fsdp`: ZeRO-3 style. Each MoE layer's expert parameters form one flat buffer
split evenly over the world; every step the whole buffer is all-gathered for the
forward (the gathered copy lives until the backward has used it), and the
gradients are reduce-scattered back to the shards. This is the dense-gathering
baseline FSSDP is measured against: its traffic does not depend on routing."""
from __future__ import annotations

import torch
from torch import nn

from hecate import ops
from hecate.comm.all_to_all import all_gather_flat, reduce_scatter_flat
from hecate.parallel.chunks import ChunkLayout, mark_expert, take_expert_parameters
from hecate.parallel.expert_compute import recomputed, run_experts
from hecate.parallel.strategy import ExpertStrategy


def _gather(shard: torch.Tensor, world: int, group) -> torch.Tensor:
    full = shard.new_empty(shard.numel() * world)
    all_gather_flat(full, shard.contiguous(), group=group)
    return full


class _GatherShards(torch.autograd.Function):
    """Forward: all-gather the flat shards. Backward: reduce-scatter (sum) the full gradient."""

    @staticmethod
    def forward(ctx, shard, world, group, stats):
        ctx.world, ctx.group, ctx.stats = world, group, stats
        n = shard.numel() * shard.element_size()
        stats.record("fsdp.all_gather", n * (world - 1), n * (world - 1))
        return _gather(shard, world, group)

    @staticmethod
    def backward(ctx, grad_full):
        out = grad_full.new_empty(grad_full.numel() // ctx.world)
        reduce_scatter_flat(out, grad_full.contiguous(), group=ctx.group)
        n = out.numel() * out.element_size()
        ctx.stats.record("fsdp.reduce_scatter", n * (ctx.world - 1), n * (ctx.world - 1))
        return out, None, None, None


class FullySharded(ExpertStrategy):
    name = "fsdp"

    def __init__(self, topology):
        self.topology = topology

    def attach(self, layer) -> None:
        world, rank = self.topology.world_size, self.topology.rank
        layout = ChunkLayout.of(layer.experts)
        flat = layout.flatten(take_expert_parameters(layer)).reshape(-1)
        per_rank = -(-flat.numel() // world)
        flat = torch.cat([flat, flat.new_zeros(per_rank * world - flat.numel())])
        layer.expert_layout = layout
        layer.expert_shard = mark_expert(nn.Parameter(flat[rank * per_rank:(rank + 1) * per_rank].clone()))

    def full_weights(self, layer) -> dict[str, torch.Tensor]:
        layout = layer.expert_layout
        full = _GatherShards.apply(layer.expert_shard, self.topology.world_size, None, self.topology.stats)
        E = layout.num_experts
        return layout.unflatten(full[:E * layout.chunk_numel].view(E, layout.chunk_numel))

    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        E = layer.config.num_experts
        # One host read: the counts give the grouped MLP its splits and the permute its row count
        # (each would read them back from the device on its own).
        counts_E = ops.expert_histogram(routing.indices_TK, E).cpu()
        x_ND, row_map_TK, _ = ops.permute(x_TD, routing.indices_TK, E, -1, num_rows=int(counts_E.sum()))
        weights = self.full_weights(layer)  # the all-gather stays outside the recomputed region
        y_ND = recomputed(layer, lambda x: run_experts(layer, x, counts_E, weights), x_ND)
        return ops.unpermute(y_ND, row_map_TK, routing.weights_TK)

    def expert_parameters(self, layer):
        return [layer.expert_shard]

    def finish_backward(self, layers) -> None:
        for layer in layers:
            p = layer.expert_shard
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad /= self.topology.world_size

    def gather_experts(self, layer, grads: bool = False) -> dict[str, torch.Tensor]:
        src = layer.expert_shard.grad if grads else layer.expert_shard.detach()
        full = _gather(src, self.topology.world_size, None)
        E, S = layer.expert_layout.num_experts, layer.expert_layout.chunk_numel
        return {n: t.clone() for n, t in layer.expert_layout.unflatten(full[:E * S].view(E, S)).items()}

    @torch.no_grad()
    def load_experts(self, layer, full: dict[str, torch.Tensor]) -> None:
        flat = layer.expert_layout.flatten(full).reshape(-1)
        n = layer.expert_shard.numel()
        flat = torch.cat([flat, flat.new_zeros(n * self.topology.world_size - flat.numel())])
        layer.expert_shard.copy_(flat[self.topology.rank * n:(self.topology.rank + 1) * n])
