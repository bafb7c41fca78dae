"""The strategy interface a MoE layer calls, and `local`, the strategy of a layer alone.

It lives in hecate/moe (below the layer) so that moe/ never imports parallel/: the
distributed strategies (hecate.parallel: dp, ep, fsdp, fssdp) implement this interface
from above. hecate.parallel.strategy and hecate.parallel.local re-export these names.

A MoE layer's forward is route -> capacity -> dispatch -> experts -> combine.
Routing and capacity are decided locally on each rank (for its own group of
tokens); a strategy owns the rest: where the expert parameters live, how
tokens reach them and how the weighted outputs come back. `local` (all experts
on this process) is the oracle every other strategy must match.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from hecate import ops

if TYPE_CHECKING:  # pragma: no cover
    from hecate.moe.layer import MoELayer
    from hecate.moe.routing import Routing


class ExpertStrategy:
    """How the experts of MoE layers are parallelized.

    Life cycle: `attach(layer)` once per MoE layer (may re-home or shard the
    layer's expert parameters); `forward(layer, x_TD, routing)` each step;
    `finish_backward(layers)` after loss.backward() and before the optimizer
    step, to bring expert gradients to where the optimizer expects them.
    """

    name = "abstract"
    # How many ranks hold an identical copy of each expert gradient after finish_backward
    # (dp: the world; ep: the expert-data-parallel group; sharded strategies: 1).
    def expert_replication(self) -> int:
        return 1

    def attach(self, layer: "MoELayer") -> None:
        pass

    def forward(self, layer: "MoELayer", x_TD: torch.Tensor, routing: "Routing") -> torch.Tensor:
        """Return sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) for every local token t.

        Entries with indices < 0 (dropped by capacity) contribute nothing.
        """
        raise NotImplementedError

    def finish_backward(self, layers: Iterable["MoELayer"]) -> None:
        pass

    def expert_parameters(self, layer: "MoELayer") -> list[torch.nn.Parameter]:
        """The expert parameters this rank's optimizer steps."""
        return list(layer.experts.parameters())

    def gather_experts(self, layer: "MoELayer", grads: bool = False) -> dict[str, torch.Tensor]:
        """Full stacked expert weights (or their gradients) {name: [E, ...]} on every rank.

        Collective for sharded strategies; used by checkpoints, export and tests.
        """
        return {n: (p.grad if grads else p.detach()).clone() for n, p in layer.experts.named_parameters()}

    @torch.no_grad()
    def load_experts(self, layer: "MoELayer", full: dict[str, torch.Tensor]) -> None:
        """Set the layer's experts from full stacked weights {name: [E, ...]} (same on every rank);
        each strategy keeps only its part. Used by checkpoint loading and import."""
        for n, p in layer.experts.named_parameters():
            p.copy_(full[n])


class LocalStrategy(ExpertStrategy):
    """`local`: every expert lives on this process; the oracle the other strategies match.

    Dispatch = permute rows by expert, experts = grouped MLP on the layer's own weights,
    combine = unpermute with the routing weights (dropped entries add nothing)."""

    name = "local"

    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        num_experts = layer.config.num_experts
        x_ND, row_map_TK, counts_E = ops.permute(x_TD, routing.indices_TK, num_experts, -1)
        y_ND = layer.experts(x_ND, counts_E)
        return ops.unpermute(y_ND, row_map_TK, routing.weights_TK)
