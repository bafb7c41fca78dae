"""SCMoE self-contrast decoding (Shi et al. 2024, "Unchosen Experts Can Contribute Too").

Next-token scores contrast the model's strong activation (its trained routing) with a weak
one (by default rank-k routing: each token uses only its k-th ranked expert, k = top_k, or
rank 2 in a top-1 layer):
    score = (1 + beta) * log p_strong - beta * log p_weak
over the plausible tokens {v : p_strong(v) >= alpha * max p_strong}; every other token gets -inf.
Log-probabilities differ from logits by a per-row constant, so this ranks (and samples) tokens
exactly as (1 + beta) * strong_logits - beta * weak_logits restricted to the same set does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SCMoE:
    beta: float
    alpha: float
    weak: dict = field(default_factory=dict)  # routing_overrides keywords of the weak pass ({} = rank-k)

    def __post_init__(self):
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"--scmoe beta={self.beta} must be finite and >= 0")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--scmoe alpha={self.alpha} must be in (0, 1]")

    def weak_overrides(self, model) -> dict:
        """routing_overrides keywords of the weak pass for `model` (default: rank top_k per layer)."""
        if self.weak:
            return dict(self.weak)
        from hecate.moe.overrides import moe_layers_of

        # rank-k: the weakest expert the trained routing still chooses; top-1 layers use rank 2
        # (rank 1 would repeat the strong pass)
        return {"ranks": {i: [max(layer.config.top_k, 2)] for i, layer in enumerate(moe_layers_of(model))}}


def parse_scmoe(spec: str) -> SCMoE:
    """`beta,alpha[,weak=rankK|topK]` -> SCMoE (weak default: rank-k, k = each layer's top_k)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) not in (2, 3):
        raise ValueError(f"--scmoe {spec!r} must be BETA,ALPHA[,weak=rankK|topK], e.g. 0.5,0.1,weak=rank2")
    try:
        beta, alpha = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"--scmoe {spec!r}: BETA and ALPHA must be numbers") from None
    weak = {}
    if len(parts) == 3:
        key, _, val = parts[2].partition("=")
        kind = val.rstrip("0123456789")
        num = val[len(kind):]
        if key != "weak" or kind not in ("rank", "top") or not num:
            raise ValueError(f"--scmoe item {parts[2]!r} must be weak=rankK (only the K-th ranked expert) "
                             "or weak=topK (top-K routing)")
        weak = {"ranks": [int(num)]} if kind == "rank" else {"top_k": int(num)}
    return SCMoE(beta, alpha, weak)


def contrast(strong_BV: torch.Tensor, weak_BV: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE scores [B, V] from strong and weak logits (see the module doc)."""
    ls = torch.log_softmax(strong_BV.float(), -1)
    lw = torch.log_softmax(weak_BV.float(), -1)
    keep = ls >= ls.max(-1, keepdim=True).values + math.log(alpha)
    return ((1 + beta) * ls - beta * lw).masked_fill(~keep, float("-inf"))
