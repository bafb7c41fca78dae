"""MoEConfig: every knob of one MoE layer, validated in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

ROUTER_KINDS = ("topk", "switch", "noisy_topk", "expert_choice", "group_limited")
SCORE_FUNCS = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "swiglu")
DROP_POLICIES = ("position", "probability")
GROUP_SCORES = ("max", "top2_sum")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (see docs/moe.md for the meaning of each knob).

    capacity_factor None means dropless (every routed token is computed);
    eval_capacity_factor is used instead in eval mode (None = dropless in eval).
    Aux-loss coefficients of 0 switch that loss off (it is then not computed).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    # router
    router: str = "topk"
    score_func: str = "softmax"
    renormalize: bool = True
    num_groups: int = 1          # group_limited: experts form num_groups equal groups
    topk_groups: int = 1         # group_limited: groups a token may use
    group_score: str = "max"     # group_limited: "max" (top-1 score) or "top2_sum"
    jitter_eps: float = 0.0      # switch: multiplicative input noise U(1-eps, 1+eps) in training
    aux_free_bias: bool = False  # DeepSeek-V3 bias that steers selection only
    bias_update_rate: float = 1e-3
    # capacity
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 4
    drop_policy: str = "position"
    # experts
    activation: str = "gelu"
    num_shared_experts: int = 0
    shared_expert_hidden_size: Optional[int] = None  # per shared expert; None = ffn_hidden_size
    use_residual: bool = False
    shared_expert_gate: bool = False      # Qwen2-MoE: shared output scaled by sigmoid(x @ g^T), g [1, D]
    routed_scaling_factor: float = 1.0    # DeepSeek-V3: routed combine weights times this factor
    expert_bias: bool = False             # experts' Linear layers carry biases (Megatron add_bias_linear)
    router_bias: bool = False             # the router's logits carry a learned bias (Megatron add_bias_linear)
    # balancing losses (already multiplied into Routing.aux_losses)
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    expert_balance_coeff: float = 0.0
    device_balance_coeff: float = 0.0
    num_devices: int = 1

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "MoEConfig":
        """Raise ValueError naming the offending field; return self when valid."""
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "lower top_k or add experts")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"MoEConfig.router={self.router!r} is unknown; choose one of {ROUTER_KINDS}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"MoEConfig.score_func={self.score_func!r}; choose one of {SCORE_FUNCS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation={self.activation!r}; choose one of {ACTIVATIONS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"MoEConfig.drop_policy={self.drop_policy!r}; choose one of {DROP_POLICIES}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"MoEConfig.group_score={self.group_score!r}; choose one of {GROUP_SCORES}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoEConfig.top_k must be 1 for router='switch', got {self.top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"MoEConfig.{name} must be > 0 or None (dropless), got {v!r}")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"MoEConfig.min_capacity must be an int >= 0, got {self.min_capacity!r}")
        if self.num_groups <= 0 or self.num_experts % self.num_groups:
            raise ValueError(
                f"MoEConfig.num_groups={self.num_groups} must be positive and divide "
                f"num_experts={self.num_experts}")
        if not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(
                f"MoEConfig.topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        if self.router == "group_limited":
            reachable = self.topk_groups * (self.num_experts // self.num_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"MoEConfig.topk_groups={self.topk_groups} groups hold only {reachable} experts "
                    f"but top_k={self.top_k}; raise topk_groups")
            if self.group_score == "top2_sum" and self.num_experts // self.num_groups < 2:
                raise ValueError("MoEConfig.group_score='top2_sum' needs >= 2 experts per group")
        if self.router == "expert_choice":
            for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "expert_balance_coeff",
                         "device_balance_coeff"):
                if getattr(self, name):
                    raise ValueError(f"MoEConfig.{name} must be 0 for router='expert_choice' "
                                     "(balanced by construction; only z_loss_coeff applies)")
            if self.aux_free_bias:
                raise ValueError("MoEConfig.aux_free_bias is not supported by router='expert_choice'")
        if self.num_devices <= 0 or self.num_experts % self.num_devices:
            raise ValueError(
                f"MoEConfig.num_devices={self.num_devices} must be positive and divide "
                f"num_experts={self.num_experts}")
        if self.jitter_eps < 0 or self.jitter_eps >= 1:
            raise ValueError(f"MoEConfig.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.bias_update_rate < 0:
            raise ValueError(f"MoEConfig.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("MoEConfig.shared_expert_gate=True needs num_shared_experts >= 1")
        if self.expert_bias and (self.num_shared_experts or self.use_residual):
            raise ValueError("MoEConfig.expert_bias=True applies to routed experts only; the shared experts and "
                             "the residual MLP are bias-free (set num_shared_experts=0, use_residual=False)")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_hidden_size is not None and self.shared_expert_hidden_size <= 0:
            raise ValueError(
                f"MoEConfig.shared_expert_hidden_size must be positive or None, "
                f"got {self.shared_expert_hidden_size}")
        for name in ("aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff",
                     "expert_balance_coeff", "device_balance_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")
        return self
