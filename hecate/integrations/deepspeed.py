"""`MoE`: a drop-in for `deepspeed.moe.layer.MoE` backed by a Hecate strategy.

Same constructor arguments and the same return value `(output, l_aux, exp_counts)`; the
gate reproduces DeepSpeed's TopKGate (see docs/deepspeed.md for the mapping):

- softmax gate in fp32, top-k; k = 1 keeps the raw probability as the combine weight,
  k >= 2 renormalizes the weights over the entries that SURVIVE the capacity drop;
- capacity per rank = max(min_capacity, ceil(capacity_factor * k * T_rank / E)), which is
  Hecate's capacity rule with one group per rank; drops keep 1st choices before 2nd
  choices (k <= 2, DeepSpeed's location order) or the highest gate values (k > 2, its
  'probs' policy). drop_tokens=False is Hecate's dropless mode (DeepSpeed pads every expert
  to the largest load, which computes the same result);
- l_aux = E * sum_e mean_t(p_te) * frac_e with frac over 1st choices (k <= 2), or
  E / k * sum_e mean_t(p_te) * frac_e over all k choices (k > 2);
- exp_counts = this rank's (token, choice) entries per expert before drops;
- DeepSpeed's random parts with DeepSpeed's defaults: 'Jitter' (router input times
  U(0.99, 1.01), training), 'RSample' (k = 1: Gumbel noise on the logits picks the expert,
  training), use_rts (k = 1: which tokens an over-full expert keeps is decided by uniforms),
  top2_2nd_expert_sampling (k = 2: the 2nd expert is the argmax of Gumbel-noised logits
  without the 1st; DeepSpeed samples in eval too). Each is drawn with DeepSpeed's sampler in
  DeepSpeed's order, so the same generator state gives the same draws.

DeepSpeed itself is never imported here: the layer runs without it.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
from torch import nn

from hecate.integrations.expert_module import expert_mlp_weights, module_experts_for
from hecate.integrations.strategy_choice import attach, resolve_strategy
from hecate.moe.capacity import compute_capacity, kept_mask
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.moe.routing import Routing
from hecate.parallel.strategy import ExpertStrategy

JITTER_EPS = 1e-2  # deepspeed.moe.sharded_moe.multiplicative_jitter's epsilon


def deepspeed_moe_config(hidden_size: int, ffn_hidden_size: int, num_experts: int = 1, ep_size: int = 1,
                         k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                         min_capacity: int = 4, use_residual: bool = False,
                         noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                         use_rts: bool = True, use_tutel: bool = False,
                         enable_expert_tensor_parallelism: bool = False,
                         top2_2nd_expert_sampling: bool = True) -> MoEConfig:
    """The MoEConfig equivalent to DeepSpeed MoE arguments; ValueError naming the argument
    for every value Hecate cannot honour (nothing is silently ignored)."""
    for name, v in (("hidden_size", hidden_size), ("num_experts", num_experts), ("ep_size", ep_size),
                    ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds num_experts={num_experts}")
    for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
    if noisy_gate_policy not in (None, "None", "Jitter", "RSample"):
        raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} must be None, 'Jitter' or 'RSample'")
    for name, v in (("use_rts", use_rts), ("top2_2nd_expert_sampling", top2_2nd_expert_sampling),
                    ("drop_tokens", drop_tokens), ("use_residual", use_residual)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    if enable_expert_tensor_parallelism:
        raise ValueError("enable_expert_tensor_parallelism=True is not supported: Hecate shards whole "
                         "experts (fssdp/fsdp/ep), never slices one expert's matrices; pass False")
    if not isinstance(use_tutel, bool):
        raise ValueError(f"use_tutel must be a bool, got {use_tutel!r}")  # a kernel choice: no effect
    cf = float(capacity_factor) if drop_tokens else None
    ecf = float(eval_capacity_factor) if drop_tokens else None
    return MoEConfig(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, num_experts=num_experts,
                     top_k=k, router="topk", score_func="softmax", renormalize=False,
                     capacity_factor=cf, eval_capacity_factor=ecf, min_capacity=min_capacity,
                     drop_policy="position" if k <= 2 else "probability", activation="gelu",
                     use_residual=bool(use_residual), aux_loss_coeff=0.0).validate()


def deepspeed_l_aux(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's gate loss on one rank's tokens (pre-drop indices), see the module doc."""
    t, e = probs_TE.shape
    k = indices_TK.shape[1]
    if t == 0:
        return probs_TE.sum() * 0.0
    chosen = indices_TK[:, :1] if k <= 2 else indices_TK
    mask_TE = torch.zeros(t, e, device=probs_TE.device).scatter_(1, chosen, 1.0)
    scale = e if k <= 2 else e / k
    return (probs_TE.float().mean(0) * mask_TE.mean(0)).sum() * scale


def _uniform(low: float, high: float, shape, device) -> torch.Tensor:
    """U(low, high) drawn exactly as DeepSpeed draws it (torch.distributions Uniform.rsample)."""
    return torch.distributions.uniform.Uniform(torch.tensor(low, device=device),
                                               torch.tensor(high, device=device)).rsample(shape)


def _gumbel(shape, device) -> torch.Tensor:
    """Gumbel(0, 1) noise drawn exactly as DeepSpeed's gumbel_rsample draws it."""
    return torch.distributions.gumbel.Gumbel(torch.tensor(0.0, device=device),
                                             torch.tensor(1.0, device=device)).rsample(shape)


class DeepSpeedGateMoELayer(MoELayer):
    """MoELayer whose routing stages follow DeepSpeed's TopKGate (jitter, RSample, random token
    selection, the sampled 2nd expert, l_aux, post-drop renormalization); dispatch, experts and
    combine stay the strategy's. Random draws are made in DeepSpeed's order with DeepSpeed's
    samplers, so with the same generator state they are DeepSpeed's draws."""

    def __init__(self, config: MoEConfig, jitter: bool = False, strategy=None, *, rsample: bool = False,
                 use_rts: bool = False, second_expert_sampling: bool = False):
        super().__init__(config, strategy)
        self.jitter, self.rsample = jitter, rsample
        self.use_rts, self.second_expert_sampling = use_rts, second_expert_sampling
        self._rts_priority_TK = None

    def route(self, x_TD, *, top_k, capacity_factor, group_sizes, seq_len=None) -> Routing:
        if self.jitter and self.training:  # DeepSpeed 'Jitter': noise on the router input only
            x_TD = x_TD.float() * _uniform(1.0 - JITTER_EPS, 1.0 + JITTER_EPS, x_TD.shape, x_TD.device)
        self._rts_priority_TK = None
        k = top_k
        sampled = (k == 1 and (self.use_rts or (self.rsample and self.training))) or \
                  (k == 2 and self.second_expert_sampling)
        if not sampled:
            return super().route(x_TD, top_k=top_k, capacity_factor=capacity_factor,
                                 group_sizes=group_sizes, seq_len=seq_len)
        logits_TE = self.router.logits(x_TD)
        gates_TE = torch.softmax(logits_TE, dim=1)
        with torch.no_grad():
            if k == 1:  # top1gating: RSample noise (training), then the RTS uniforms
                select_TE = gates_TE
                if self.rsample and self.training:
                    select_TE = logits_TE + _gumbel(logits_TE.shape, logits_TE.device)
                indices_TK = torch.argmax(select_TE, dim=1).unsqueeze(1)
                if self.use_rts:  # DeepSpeed draws them whether or not tokens are dropped
                    u_TE = _uniform(0.0, 1.0, logits_TE.shape, logits_TE.device)
                    self._rts_priority_TK = u_TE.gather(1, indices_TK)
            else:  # top2gating: 1st = argmax; 2nd = argmax of Gumbel-noised logits without the 1st
                first_T = torch.argmax(gates_TE, dim=1)
                noisy_TE = logits_TE + _gumbel(logits_TE.shape, logits_TE.device)
                noisy_TE.scatter_(1, first_T.unsqueeze(1), float("-inf"))
                indices_TK = torch.stack([first_T, torch.argmax(noisy_TE, dim=1)], dim=1)
        routing = self.router._routing(indices_TK, gates_TE.gather(1, indices_TK), gates_TE, logits_TE)
        return routing.replace(aux_losses=self.aux_losses(routing, group_sizes, seq_len),
                               group_sizes=list(group_sizes))

    def aux_losses(self, routing: Routing, group_sizes: Sequence[int], seq_len) -> dict:
        per_group, start = [], 0
        for size in group_sizes:
            sl = slice(start, start + size)
            per_group.append(deepspeed_l_aux(routing.scores_TE[sl], routing.indices_TK[sl]))
            start += size
        return {"l_aux": torch.stack(per_group).mean()}

    def apply_capacity(self, routing: Routing, capacity_factor, group_sizes) -> Routing:
        priority, self._rts_priority_TK = self._rts_priority_TK, None
        if priority is not None and capacity_factor is not None:
            # Random token selection: each expert keeps the tokens with the largest uniforms
            # (DeepSpeed's topk over mask * U), decided per group (a rank's tokens).
            e = routing.num_experts
            keep, start = [], 0
            for size in group_sizes:
                sl = slice(start, start + size)
                cap = compute_capacity(size, 1, e, capacity_factor, self.config.min_capacity)
                keep.append(kept_mask(routing.indices_TK[sl], priority[sl], e, cap, "probability"))
                start += size
            keep_TK = torch.cat(keep) if keep else routing.indices_TK >= 0
            return routing.replace(indices_TK=torch.where(keep_TK, routing.indices_TK, -1),
                                   weights_TK=routing.weights_TK * keep_TK.to(routing.weights_TK.dtype))
        routing = super().apply_capacity(routing, capacity_factor, group_sizes)
        if routing.indices_TK.shape[1] == 1:
            return routing  # top-1: the raw probability (DeepSpeed's top1gating)
        w_TK = routing.weights_TK
        denom = w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).eps)
        return routing.replace(weights_TK=w_TK / denom)


class MoE(nn.Module):
    """Drop-in for deepspeed.moe.layer.MoE; forward(hidden_states) -> (output, l_aux, exp_counts).

    Extra keywords: strategy (name or ExpertStrategy; default 'fssdp', 'local' when
    torch.distributed is not initialized), strategy_options (dict for build_strategy),
    topology (hecate.comm.Topology; default built from torch.distributed).
    Like DeepSpeed, every expert (and the residual MLP) starts as a copy of `expert`.
    ep_size is validated (divides num_experts and the world) and used as the group size by
    strategy='ep'; other strategies place experts themselves, with identical results.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False, top2_2nd_expert_sampling: bool = True,
                 *, strategy: Union[str, ExpertStrategy] = "fssdp", strategy_options: Optional[dict] = None,
                 topology=None):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        try:  # the built-in grouped GELU MLP: the fastest path
            w1_FD, w2_DF, _ = expert_mlp_weights(expert, hidden_size)
            module_experts, ffn = None, w1_FD.shape[0]
        except ValueError:  # any other module: its parameters stacked per expert (ModuleExperts)
            module_experts, ffn = module_experts_for(expert, hidden_size, num_experts), hidden_size
        cfg = deepspeed_moe_config(hidden_size, ffn, num_experts, ep_size, k, capacity_factor,
                                   eval_capacity_factor, min_capacity, use_residual, noisy_gate_policy,
                                   drop_tokens, use_rts, use_tutel, enable_expert_tensor_parallelism,
                                   top2_2nd_expert_sampling)
        self.hidden_size, self.num_experts, self.ep_size, self.k = hidden_size, num_experts, ep_size, k
        self.use_residual = bool(use_residual)
        self.moe = DeepSpeedGateMoELayer(cfg, jitter=noisy_gate_policy == "Jitter",
                                         rsample=noisy_gate_policy == "RSample" and k == 1,
                                         use_rts=use_rts and k == 1,
                                         second_expert_sampling=top2_2nd_expert_sampling and k == 2)
        if module_experts is not None:
            self.moe.experts = module_experts
            if self.moe.residual is not None:  # DeepSpeed's residual MLP is a copy of the expert too
                self.moe.residual.mlp = copy.deepcopy(expert)
        else:
            with torch.no_grad():
                self.moe.experts.w1_EFD.copy_(w1_FD.expand_as(self.moe.experts.w1_EFD))
                self.moe.experts.w2_EDF.copy_(w2_DF.expand_as(self.moe.experts.w2_EDF))
                if self.moe.residual is not None:
                    self.moe.residual.mlp.w1_FD.copy_(w1_FD)
                    self.moe.residual.mlp.w2_DF.copy_(w2_DF)
        strat = resolve_strategy(strategy, strategy_options, topology, ep_size)
        attach(self.moe, strat)

    @property
    def strategy(self) -> ExpertStrategy:
        return self.moe.strategy

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Accepted for drop-in compatibility: Hecate's strategy already owns the placement."""

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise ValueError("used_token is not supported (DeepSpeed applies it to top-1 gating only); "
                             "remove the masked tokens from hidden_states instead")
        d = self.hidden_size
        if hidden_states.shape[-1] != d:
            raise ValueError(f"hidden_states must end in hidden_size={d}, got {tuple(hidden_states.shape)}")
        out = self.moe(hidden_states.reshape(-1, d))
        return out.y.reshape(hidden_states.shape), out.aux_loss, out.stats.tokens_per_expert_E


# ---- training helpers ----------------------------------------------------------------------------
def hecate_moe_layers(model: nn.Module) -> list:
    """Every Hecate MoE layer of `model` (drop-in or native), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_parameters(model: nn.Module) -> list:
    """The expert parameters this rank steps (give them to a Hecate-side optimizer)."""
    return [p for layer in hecate_moe_layers(model) for p in layer.strategy.expert_parameters(layer)]


def dense_parameters(model: nn.Module) -> list:
    """Everything else (give these to deepspeed.initialize(model_parameters=...))."""
    experts = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in experts]


def finish_backward(model: nn.Module) -> None:
    """After backward: let each strategy bring its expert gradients home (collective)."""
    by_strategy: dict = {}
    for layer in hecate_moe_layers(model):
        by_strategy.setdefault(id(layer.strategy), (layer.strategy, []))[1].append(layer)
    for strat, layers in by_strategy.values():
        strat.finish_backward(layers)


class ExpertStep:
    """The Hecate half of a deepspeed.initialize run: after `engine.backward(loss)` call
    `step(engine)` before `engine.step()`; at accumulation boundaries it brings expert
    gradients home (finish_backward), steps `optimizer` over the expert parameters, zeroes
    their grads and runs the strategy's end-of-step hook (fssdp re-sharding)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def step(self, engine=None) -> bool:
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            return False
        finish_backward(self.model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seen = set()
        for layer in hecate_moe_layers(self.model):
            strat = layer.strategy
            if id(strat) not in seen and hasattr(strat, "step_end"):
                seen.add(id(strat))
                strat.step_end([m for m in hecate_moe_layers(self.model) if m.strategy is strat],
                               self.optimizer)
        return True


def initialize(model: nn.Module, config: dict, make_optimizer, **ds_kwargs):
    """deepspeed.initialize over the dense parameters, Hecate over the experts.

    make_optimizer(params) builds one optimizer (e.g. torch AdamW); it is called for the
    dense parameters (handed to DeepSpeed, which partitions its state under ZeRO 1/2) and
    for the expert parameters (stepped by the returned ExpertStep). Returns
    (engine, expert_step). Expert parameters are rank-unique shards: they are hidden from
    DeepSpeed's initial broadcast. ZeRO stage 0 is refused: its fallback all-reduce averages
    every module gradient, which would mix different ranks' expert shards.
    """
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (1, 2):
        raise ValueError(f"zero_optimization.stage={stage}: Hecate experts train under DeepSpeed with "
                         "ZeRO stage 1 or 2 (stage 0 all-reduces expert shards, stage 3 partitions them)")
    import deepspeed

    experts = expert_parameters(model)
    for p in experts:
        p.ds_optim_param = True  # DeepSpeed's marker for rank-unique params: skip the broadcast
    dense = dense_parameters(model)
    cfg = dict(config)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(dense), config=cfg,
                                           **ds_kwargs)
    return engine, ExpertStep(model, make_optimizer(experts))
