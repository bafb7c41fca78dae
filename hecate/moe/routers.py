"""Routers: score tokens against experts and pick where each token goes.

Every router computes its logits and all selection math in fp32, even under
bf16 autocast, and returns a `Routing` (aux losses are added by the layer).
Ties always go to the lower expert (or group, or token) index.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hecate import ops
from hecate.moe.capacity import check_group_sizes, compute_capacity
from hecate.moe.config import MoEConfig
from hecate.moe.routing import Routing


def topk_stable(values_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, descending; ties: lower index first."""
    return torch.sort(values_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def score(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


def _renorm(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _count(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return ops.expert_histogram(indices_TK, num_experts)


class Router(nn.Module):
    """Base: a bias-free linear gate weight_ED and the aux-free selection bias."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        e, d = config.num_experts, config.hidden_size
        self.weight_ED = nn.Parameter(torch.empty(e, d))
        # DeepSeek-V3 aux-free balancing: steers selection only, never the weights.
        self.register_buffer("expert_bias_E", torch.zeros(e), persistent=True)
        # A learned logit bias (Megatron's router with add_bias_linear); None when bias-free.
        self.bias_E = nn.Parameter(torch.zeros(e)) if getattr(config, "router_bias", False) else None
        # Inference-time routing overrides (hecate.moe.overrides.routing_overrides sets it for a `with`).
        self.override = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.config.hidden_size)
        nn.init.uniform_(self.weight_ED, -bound, bound)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 router logits [T, E] (autocast off so bf16 runs keep fp32 routing)."""
        # Entering torch.autocast costs tens of microseconds, a decode step's MoE layer about as
        # much as its matmul: only switch it off when it is on.
        if not torch.is_autocast_enabled(x_TD.device.type):
            return self._logits_fp32(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._logits_fp32(x_TD)

    def _logits_fp32(self, x_TD: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias_E is None else self.bias_E.float()
        logits_TE = F.linear(x_TD.float(), self.weight_ED.float(), bias)
        return logits_TE if self.override is None else self.override.adjust_logits(logits_TE)

    def selection_bias(self) -> Optional[torch.Tensor]:
        bias = self.expert_bias_E if self.config.aux_free_bias else None
        return bias if self.override is None else self.override.adjust_bias(bias)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """bias_i += rate * sign(mean_load - load_i): raise underloaded experts, lower overloaded.

        Call once per step with the load of the whole step (summed over ranks and
        micro-batches) so every rank keeps the same bias.
        """
        load = tokens_per_expert_E.to(self.expert_bias_E.device).float()
        if load.shape != self.expert_bias_E.shape:
            raise ValueError(f"tokens_per_expert_E must have shape {tuple(self.expert_bias_E.shape)}, "
                             f"got {tuple(load.shape)}")
        self.expert_bias_E += self.config.bias_update_rate * torch.sign(load.mean() - load)

    def _routing(self, indices_TK, weights_TK, scores_TE, logits_TE) -> Routing:
        return Routing(indices_TK=indices_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                       logits_TE=logits_TE,
                       tokens_per_expert_E=_count(indices_TK, self.config.num_experts))

    def forward(self, x_TD: torch.Tensor, *, top_k: Optional[int] = None,
                capacity_factor: Optional[float] = None,
                group_sizes: Optional[Sequence[int]] = None) -> Routing:
        raise NotImplementedError


class TopKRouter(Router):
    """Token choice: each token picks its top-k experts by score (+ aux-free bias).

    weights = unbiased scores of the chosen experts, divided by their sum when
    config.renormalize.
    """

    def _gate(self, logits_TE: torch.Tensor, k: int, renormalize: bool) -> Routing:
        # One fused kernel computes scores, the biased selection and the weights; its
        # autograd (hecate.ops._autograd.TopkGating) carries the gradient of the weights
        # and of the scores (the aux losses use them) back to the logits.
        weights_TK, indices_TK, scores_TE = ops.topk_gating(logits_TE, k, self.config.score_func,
                                                            renormalize, self.selection_bias())
        return self._routing(indices_TK, weights_TK, scores_TE, logits_TE)

    def forward(self, x_TD, *, top_k=None, capacity_factor=None, group_sizes=None):
        k = top_k or self.config.top_k
        return self._gate(self.logits(x_TD), k, self.config.renormalize)


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1: weight = softmax prob of the chosen expert (never
    renormalized, which would make it 1 and cut the router's gradient); in training the
    router input is multiplied by U(1 - jitter_eps, 1 + jitter_eps) noise."""

    def forward(self, x_TD, *, top_k=None, capacity_factor=None, group_sizes=None):
        if top_k not in (None, 1):
            raise ValueError(f"top_k={top_k}: the switch router is top-1 only")
        eps = self.config.jitter_eps
        if self.training and eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return self._gate(self.logits(x_TD), 1, False)


class NoisyTopKRouter(TopKRouter):
    """Shazeer et al. 2017 noisy top-k: in training the logits get
    N(0, 1) * softplus(x @ noise_weight_ED^T) added (a learned per-expert noise std)."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.noise_weight_ED = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x_TD, *, top_k=None, capacity_factor=None, group_sizes=None):
        k = top_k or self.config.top_k
        logits_TE = self.logits(x_TD)
        if self.training:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight_ED.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        return self._gate(logits_TE, k, self.config.renormalize)


class GroupLimitedRouter(TopKRouter):
    """DeepSeek-V3 node-limited routing: experts form num_groups contiguous groups;
    a token first picks topk_groups groups by group score (the max, or sum of the top-2,
    of the biased scores inside the group), then its top-k experts inside those groups."""

    def forward(self, x_TD, *, top_k=None, capacity_factor=None, group_sizes=None):
        cfg = self.config
        k = top_k or cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = score(logits_TE, cfg.score_func)
        t, e = scores_TE.shape
        g = cfg.num_groups
        if k > cfg.topk_groups * (e // g):
            raise ValueError(f"top_k={k} exceeds the {cfg.topk_groups * (e // g)} experts of "
                             f"topk_groups={cfg.topk_groups} groups")
        with torch.no_grad():
            select_TE = scores_TE.detach().clone()
            bias = self.selection_bias()
            if bias is not None:
                select_TE += bias
            select_TGX = select_TE.view(t, g, e // g)
            if cfg.group_score == "max":
                group_TG = select_TGX.max(dim=-1).values
            else:
                group_TG = select_TGX.topk(2, dim=-1).values.sum(dim=-1)
            groups_TK = topk_stable(group_TG, cfg.topk_groups)
            allowed_TG = torch.zeros(t, g, dtype=torch.bool, device=x_TD.device)
            allowed_TG.scatter_(1, groups_TK, True)
            allowed_TE = allowed_TG.repeat_interleave(e // g, dim=1)
            masked = select_TE.masked_fill(~allowed_TE, float("-inf"))
            indices_TK = topk_stable(masked, k)
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.renormalize:
            weights_TK = _renorm(weights_TK)
        return self._routing(indices_TK, weights_TK, scores_TE, logits_TE)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert picks its top-C tokens of the group by
    softmax score, C = compute_capacity(T_g, k, E, capacity_factor or 1.0, min_capacity),
    capped at T_g. A token may get 0..E experts.

    Representation: K = E slots; indices[t, e] = e when expert e chose token t, else -1;
    weights[t, e] = scores[t, e] where chosen, else 0. Capacity is enforced here, so the
    layer skips apply_capacity for this router. Ties: the lower token index wins.
    """

    def forward(self, x_TD, *, top_k=None, capacity_factor=None, group_sizes=None):
        cfg = self.config
        k = top_k or cfg.top_k
        cf = capacity_factor or cfg.capacity_factor or 1.0
        logits_TE = self.logits(x_TD)
        scores_TE = torch.softmax(logits_TE, dim=-1)
        t, e = scores_TE.shape
        chosen_TE = torch.zeros(t, e, dtype=torch.bool, device=x_TD.device)
        start = 0
        with torch.no_grad():
            for size in check_group_sizes(group_sizes, t):
                cap = min(size, compute_capacity(size, k, e, cf, cfg.min_capacity))
                if cap > 0:
                    block = scores_TE[start:start + size].detach()
                    top_CE = torch.sort(block, dim=0, descending=True, stable=True).indices[:cap]
                    chosen_TE[start:start + size].scatter_(0, top_CE, True)
                start += size
        expert_TE = torch.arange(e, device=x_TD.device).expand(t, e)
        indices_TK = torch.where(chosen_TE, expert_TE, torch.full_like(expert_TE, -1))
        weights_TK = scores_TE * chosen_TE.float()
        return self._routing(indices_TK.contiguous(), weights_TK, scores_TE, logits_TE)


ROUTERS = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "group_limited": GroupLimitedRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router named by config.router."""
    if config.router not in ROUTERS:
        raise ValueError(f"MoEConfig.router={config.router!r} is unknown; choose one of {tuple(ROUTERS)}")
    return ROUTERS[config.router](config)
