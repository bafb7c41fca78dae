"""MoELayer: route -> apply_capacity -> strategy (dispatch, experts, combine) -> dense parts.

Each stage is a method so a subclass or a strategy can replace one of them. Aux losses
and stats are returned as values (MoEOutput), never stored in global lists.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn

from hecate.moe import losses
from hecate.moe.capacity import apply_capacity, check_group_sizes
from hecate.moe.config import MoEConfig
from hecate.moe.experts import GroupedExperts, ResidualMix, SharedExperts
from hecate.moe.metrics import MoEStats
from hecate.moe.module_experts import biased_mlp_experts
from hecate.moe.routers import build_router
from hecate.moe.routing import Routing
from hecate.moe.strategy import LocalStrategy


class MoEOutput(NamedTuple):
    y: torch.Tensor                       # same shape as the input
    aux_loss: torch.Tensor                # scalar: sum of the weighted aux terms (add to the LM loss)
    aux_losses: Dict[str, torch.Tensor]   # each weighted term, with grad
    stats: MoEStats


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN block.

    forward(x, *, top_k=None, capacity_factor=None, group_sizes=None, seq_len=None): x is
    [B, S, D] or [T, D] (flat input: seq_len tells the sequence-wise aux loss where sequences
    end; default one sequence per group).
    top_k / capacity_factor override the config for this call (capacity_factor=math.inf
    means dropless). group_sizes splits the tokens into groups (one per rank, in order):
    capacity and aux losses are computed per group and the losses averaged, which equals
    the mean of what each rank computes alone.
    router_input (same shape as x) replaces x as the router's input only: the experts still
    compute on x (Switch-DiT routes every token of a sample by its timestep embedding).
    """

    def __init__(self, config: MoEConfig, strategy=None):
        super().__init__()
        self.config = config.validate()
        c = config
        self.router = build_router(c)
        if c.expert_bias:  # Megatron add_bias_linear: biased experts, stacked per expert (grouped path)
            self.experts = biased_mlp_experts(c.num_experts, c.hidden_size, c.ffn_hidden_size, c.activation)
        else:
            self.experts = GroupedExperts(c.num_experts, c.hidden_size, c.ffn_hidden_size, c.activation)
        self.shared_experts = None
        if c.num_shared_experts:
            self.shared_experts = SharedExperts(
                c.hidden_size, c.shared_expert_hidden_size or c.ffn_hidden_size,
                c.num_shared_experts, c.activation)
        # Qwen2-MoE's gate on the shared expert's output: sigmoid(x @ shared_gate^T).
        self.shared_gate = nn.Linear(c.hidden_size, 1, bias=False) if c.shared_expert_gate else None
        self.residual = ResidualMix(c.hidden_size, c.ffn_hidden_size, c.activation) if c.use_residual else None
        # Load seen since the last update_bias() (aux-free balancing); a distributed trainer
        # all-reduces it before calling update_bias so every rank moves the bias alike.
        self.register_buffer("load_since_update_E", torch.zeros(c.num_experts, dtype=torch.int64),
                             persistent=False)
        # Set by hecate.models.checkpointing around strategy.forward: a strategy may then keep
        # no expert activations and recompute them in backward from what it holds anyway.
        self.recompute_experts = False
        if strategy is None:
            strategy = LocalStrategy()
        self.strategy = strategy
        strategy.attach(self)

    # ---- knobs -----------------------------------------------------------------------------
    def resolve_top_k(self, top_k: Optional[int]) -> int:
        k = self.config.top_k if top_k is None else top_k
        if not isinstance(k, int) or not 1 <= k <= self.config.num_experts:
            raise ValueError(f"top_k={top_k!r} must be an int in [1, num_experts={self.config.num_experts}]")
        return k

    def resolve_capacity_factor(self, capacity_factor: Optional[float]) -> Optional[float]:
        """None -> the config's (eval_capacity_factor in eval mode); inf -> dropless (None)."""
        if capacity_factor is None:
            return self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 (math.inf = dropless)")
        return None if math.isinf(capacity_factor) else float(capacity_factor)

    # ---- stages ------------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, *, top_k: int, capacity_factor: Optional[float],
              group_sizes: Sequence[int], seq_len: Optional[int] = None) -> Routing:
        """Router decision for every token plus the weighted aux losses."""
        override = self.router.override  # hecate.moe.overrides: ranks / forced experts / checks
        if override is not None:
            top_k = override.router_top_k(top_k)
        routing = self.router(x_TD, top_k=top_k, capacity_factor=capacity_factor, group_sizes=group_sizes)
        if override is not None:
            routing = override.adjust_routing(routing, self.config)
        if self.config.routed_scaling_factor != 1.0:  # DeepSeek-V3: scales the combine weights only
            routing = routing.replace(weights_TK=routing.weights_TK * self.config.routed_scaling_factor)
        return routing.replace(aux_losses=self.aux_losses(routing, group_sizes, seq_len),
                               group_sizes=list(group_sizes))

    def aux_losses(self, routing: Routing, group_sizes: Sequence[int],
                   seq_len: Optional[int]) -> Dict[str, torch.Tensor]:
        """Each enabled loss times its coefficient, computed per group and averaged over groups."""
        c = self.config
        probs_TE = losses.normalized_probs(routing.scores_TE, c.score_func)
        terms = {
            "aux_loss": (c.aux_loss_coeff, lambda p, i, l, s: losses.switch_aux_loss(p, i)),
            "z_loss": (c.z_loss_coeff, lambda p, i, l, s: losses.z_loss(l)),
            "seq_aux_loss": (c.seq_aux_loss_coeff, lambda p, i, l, s: losses.seq_aux_loss(p, i, s)),
            "expert_balance_loss": (c.expert_balance_coeff, lambda p, i, l, s: losses.expert_balance_loss(p, i)),
            "device_balance_loss": (c.device_balance_coeff,
                                    lambda p, i, l, s: losses.device_balance_loss(p, i, c.num_devices)),
        }
        out = {}
        for name, (coeff, fn) in terms.items():
            if not coeff:
                continue
            per_group, start = [], 0
            for size in group_sizes:
                sl = slice(start, start + size)
                s = seq_len or max(size, 1)
                if seq_len and size % seq_len:
                    raise ValueError(f"group_sizes entry {size} is not a multiple of the sequence "
                                     f"length {seq_len}; groups must hold whole sequences")
                per_group.append(fn(probs_TE[sl], routing.indices_TK[sl], routing.logits_TE[sl], s))
                start += size
            out[name] = coeff * torch.stack(per_group).mean()
        return out

    def apply_capacity(self, routing: Routing, capacity_factor: Optional[float],
                       group_sizes: Sequence[int]) -> Routing:
        """Drop over-capacity entries (see hecate.moe.capacity); expert choice is already capped."""
        if capacity_factor is None or self.config.router == "expert_choice":
            return routing
        return apply_capacity(routing, capacity_factor, self.config.min_capacity,
                              self.config.drop_policy, group_sizes)

    def combine_dense(self, x_TD: torch.Tensor, moe_TD: torch.Tensor) -> torch.Tensor:
        """Residual mix (DeepSpeed) then shared experts (summed)."""
        y_TD = moe_TD if self.residual is None else self.residual(x_TD, moe_TD)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, top_k: Optional[int] = None,
                capacity_factor: Optional[float] = None,
                group_sizes: Optional[Sequence[int]] = None,
                seq_len: Optional[int] = None,
                router_input: Optional[torch.Tensor] = None) -> MoEOutput:
        x_TD, routing = self.prepare(x, top_k=top_k, capacity_factor=capacity_factor, group_sizes=group_sizes,
                                     seq_len=seq_len, router_input=router_input)
        y_TD = self.combine_dense(x_TD, self.strategy.forward(self, x_TD, routing))
        return self.finish(x, y_TD, routing)

    def prepare(self, x: torch.Tensor, *, top_k: Optional[int] = None,
                capacity_factor: Optional[float] = None,
                group_sizes: Optional[Sequence[int]] = None,
                seq_len: Optional[int] = None,
                router_input: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Routing]:
        """Checks, routing and capacity: the stages before the strategy, all local to this rank
        (no collective; hecate.models.checkpointing recomputes them in backward)."""
        d = self.config.hidden_size
        if x.dim() not in (2, 3) or x.shape[-1] != d:
            raise ValueError(f"x must be [B, S, {d}] or [T, {d}] (hidden_size={d}), got {tuple(x.shape)}")
        if router_input is not None and router_input.shape != x.shape:
            raise ValueError(f"router_input must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(router_input.shape)}; broadcast it per token first "
                             "(e.g. emb_BD[:, None].expand_as(x))")
        if x.dim() == 3:
            seq_len = x.shape[1] or None  # [B, 0, D]: no tokens, no sequences
        x_TD = x.reshape(-1, d)
        if seq_len is not None and (seq_len <= 0 or x_TD.shape[0] % seq_len):
            raise ValueError(f"seq_len={seq_len} must be positive and divide the {x_TD.shape[0]} tokens")
        sizes = check_group_sizes(group_sizes, x_TD.shape[0])
        if top_k is None and self.router.override is not None:  # a routing_overrides top_k
            top_k = self.router.override.top_k
        k = self.resolve_top_k(top_k)
        cf = self.resolve_capacity_factor(capacity_factor)
        # router_input (e.g. a timestep embedding per token) decides the routing; x is computed.
        r_TD = x_TD if router_input is None else router_input.reshape(-1, d)
        routing = self.route(r_TD, top_k=k, capacity_factor=cf, group_sizes=sizes, seq_len=seq_len)
        return x_TD, self.apply_capacity(routing, cf, sizes)

    def finish(self, x: torch.Tensor, y_TD: torch.Tensor, routing: Routing) -> MoEOutput:
        """After combine_dense: aux-free load accounting, the aux-loss sum and the stats;
        y_TD takes x's shape."""
        if self.training and self.config.aux_free_bias:
            self.load_since_update_E += routing.tokens_per_expert_E.to(self.load_since_update_E.device)
        aux = routing.aux_losses
        aux_loss = torch.stack(list(aux.values())).sum() if aux else x.new_zeros((), dtype=torch.float32)
        return MoEOutput(y=y_TD.reshape(x.shape), aux_loss=aux_loss, aux_losses=aux,
                         stats=MoEStats.from_routing(routing))

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Optional[torch.Tensor] = None) -> None:
        """Aux-free balancing step: move the router bias toward underloaded experts using the
        given load, or the load accumulated by training forwards since the last call."""
        if not self.config.aux_free_bias:
            raise ValueError("update_bias needs MoEConfig.aux_free_bias=True")
        load = self.load_since_update_E if tokens_per_expert_E is None else tokens_per_expert_E
        self.router.update_bias(load)
        self.load_since_update_E.zero_()
