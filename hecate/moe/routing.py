"""Routing: the value a router returns and every later stage consumes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from hecate import ops


@dataclass
class Routing:
    """Where each token goes.

    indices_TK: int64 expert ids, -1 = dropped (capacity) or unused slot (expert choice).
    weights_TK: fp32 combine weights (carry grad to the router); 0 where indices is -1.
    scores_TE: fp32 per-token expert scores (softmax probs, or sigmoid values).
    logits_TE: fp32 router logits (what the z-loss sees).
    tokens_per_expert_E: int64 routed (token, slot) count per expert BEFORE capacity drops.
    aux_losses: name -> scalar tensor, already multiplied by its coefficient.
    group_sizes: the token groups (one per rank) the routing was decided for; None = one group.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    group_sizes: Optional[list] = None

    @property
    def num_tokens(self) -> int:
        return self.indices_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[1]

    def replace(self, **changes) -> "Routing":
        return dataclasses.replace(self, **changes)

    def kept_per_expert(self) -> torch.Tensor:
        """int64 [E]: (token, slot) entries each expert computes after drops (counted on the
        indices' device without reading them back: no boolean mask, no bincount)."""
        return ops.expert_histogram(self.indices_TK, self.num_experts)
