"""MoEStats: what one MoE layer reports for one forward (the trainer logs it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from hecate.moe.routing import Routing


@dataclass
class MoEStats:
    """Per layer, per forward. Tensors are detached; the float views sync with the device
    only when read (so a trainer that logs every N steps pays nothing in between).

    tokens_per_expert_E: routed (token, slot) entries per expert before capacity drops.
    kept_per_expert_E: entries computed per expert after drops.
    """

    tokens_per_expert_E: torch.Tensor
    kept_per_expert_E: torch.Tensor
    aux_loss_tensors: Dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_routing(cls, routing: Routing) -> "MoEStats":
        return cls(tokens_per_expert_E=routing.tokens_per_expert_E.detach(),
                   kept_per_expert_E=routing.kept_per_expert().detach(),
                   aux_loss_tensors={k: v.detach() for k, v in routing.aux_losses.items()})

    def imbalance_tensor(self) -> torch.Tensor:
        """imbalance as a 0-d fp32 tensor on the stats' device (no read back)."""
        load = self.tokens_per_expert_E.float()
        mean = load.mean()
        return torch.where(mean > 0, load.max() / mean.clamp_min(1e-30), torch.ones_like(mean))

    def dropped_fraction_tensor(self) -> torch.Tensor:
        """dropped_fraction as a 0-d fp32 tensor on the stats' device (no read back)."""
        routed = self.tokens_per_expert_E.sum().float()
        kept = self.kept_per_expert_E.sum().float()
        return torch.where(routed > 0, 1.0 - kept / routed.clamp_min(1.0), torch.zeros_like(routed))

    @property
    def imbalance(self) -> float:
        """max / mean of tokens_per_expert_E (1.0 = perfectly balanced; 0 tokens -> 1.0)."""
        load = self.tokens_per_expert_E.float()
        mean = float(load.mean())
        return float(load.max()) / mean if mean > 0 else 1.0

    @property
    def dropped_fraction(self) -> float:
        """Fraction of routed entries dropped by capacity."""
        routed = int(self.tokens_per_expert_E.sum())
        return 1.0 - int(self.kept_per_expert_E.sum()) / routed if routed else 0.0

    @property
    def aux_losses(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.aux_loss_tensors.items()}

    def to_dict(self, prefix: str = "") -> Dict[str, float]:
        """Flat floats for logging: imbalance, dropped_fraction, each aux loss."""
        out = {f"{prefix}imbalance": self.imbalance, f"{prefix}dropped_fraction": self.dropped_fraction}
        out.update({f"{prefix}{k}": v for k, v in self.aux_losses.items()})
        return out
