"""`dp`: every rank holds every expert; expert gradients are averaged over the world."""
from __future__ import annotations

import torch.distributed as dist

from hecate import ops
from hecate.parallel.chunks import mark_expert
from hecate.parallel.expert_compute import recomputed
from hecate.parallel.local import LocalStrategy


class DataParallel(LocalStrategy):
    name = "dp"

    def __init__(self, topology):
        self.topology = topology

    def attach(self, layer) -> None:
        for p in layer.experts.parameters():
            mark_expert(p)

    def forward(self, layer, x_TD, routing):
        """LocalStrategy's forward, with the expert MLP recomputed under activation checkpointing."""
        # One host read: the counts give the grouped MLP its splits and the permute its row count
        # (each would read them back from the device on its own).
        E = layer.config.num_experts
        counts_E = ops.expert_histogram(routing.indices_TK, E).cpu()
        x_ND, row_map_TK, _ = ops.permute(x_TD, routing.indices_TK, E, -1, num_rows=int(counts_E.sum()))
        y_ND = recomputed(layer, lambda x: layer.experts(x, counts_E), x_ND)
        return ops.unpermute(y_ND, row_map_TK, routing.weights_TK)

    def expert_replication(self) -> int:
        return self.topology.world_size

    def finish_backward(self, layers) -> None:
        import torch

        world = self.topology.world_size
        grads = []
        for layer in layers:
            for p in layer.experts.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if not grads or world == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        n = flat.numel() * flat.element_size()
        self.topology.stats.record("dp.all_reduce", 2 * (world - 1) * n // world, 2 * (world - 1) * n // world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
