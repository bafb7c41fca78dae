"""`local`: every expert lives on this process. The oracle the other strategies match."""
from __future__ import annotations

import torch

from hecate import ops
from hecate.parallel.strategy import ExpertStrategy


class LocalStrategy(ExpertStrategy):
    """Dispatch = permute rows by expert, experts = grouped MLP on the layer's own
    weights, combine = unpermute with the routing weights (dropped entries add nothing)."""

    name = "local"

    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        num_experts = layer.config.num_experts
        x_ND, row_map_TK, counts_E = ops.permute(x_TD, routing.indices_TK, num_experts, -1)
        y_ND = layer.experts(x_ND, counts_E)
        return ops.unpermute(y_ND, row_map_TK, routing.weights_TK)
