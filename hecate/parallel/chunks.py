"""Expert parameters as chunks: one flat row per expert (the unit of sharding).

Every expert parameter of a MoE layer is stacked over experts ([E, ...]); the
chunk of expert e is the concatenation of every parameter's e-th slice. The
layout is the same on every rank, so a chunk id and a row offset are enough to
find any weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn


@dataclass(frozen=True)
class ChunkLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # per-expert shape of each parameter
    num_experts: int

    @classmethod
    def of(cls, experts: nn.Module) -> "ChunkLayout":
        params = [(n, p) for n, p in experts.named_parameters() if "." not in n]
        if not params:
            raise ValueError("the experts module has no stacked parameters to chunk")
        num_experts = params[0][1].shape[0]
        for n, p in params:
            if p.shape[0] != num_experts:
                raise ValueError(f"expert parameter {n} has leading dim {p.shape[0]}, expected {num_experts} experts")
        return cls(tuple(n for n, _ in params), tuple(tuple(p.shape[1:]) for _, p in params), num_experts)

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @cached_property  # read per layer and step by fssdp's planning; the layout never changes
    def chunk_numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: [M, *shape]} -> [M, S]."""
        # flatten(1), not reshape(M, -1): the latter is ambiguous for M = 0 rows.
        return torch.cat([tensors[n].flatten(1) for n in self.names], dim=1)

    def unflatten(self, buf_MS: torch.Tensor) -> dict[str, torch.Tensor]:
        """[M, S] -> {name: [M, *shape]} as views (gradients flow back into buf_MS)."""
        if buf_MS.dim() != 2 or buf_MS.shape[1] != self.chunk_numel:
            raise ValueError(f"chunk buffer must be [M, {self.chunk_numel}], got {tuple(buf_MS.shape)}")
        out, start = {}, 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            out[n] = buf_MS[:, start:start + size].reshape(buf_MS.shape[0], *shape)
            start += size
        return out


def take_expert_parameters(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the stacked expert parameters from layer.experts and return their data.

    Strategies that re-home the experts (fsdp, fssdp) register their own
    parameters instead, so the model's parameter list shows what this rank
    really keeps.
    """
    layout = ChunkLayout.of(layer.experts)
    data = {}
    for n in layout.names:
        data[n] = getattr(layer.experts, n).detach()
        delattr(layer.experts, n)
    return data


def mark_expert(p: nn.Parameter) -> nn.Parameter:
    """Expert parameters are synchronized by their strategy, never by the dense data-parallel all-reduce."""
    p.hecate_expert = True
    return p


def is_expert_parameter(p: torch.Tensor) -> bool:
    return getattr(p, "hecate_expert", False)
