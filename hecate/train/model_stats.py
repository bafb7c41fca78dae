"""Parameter counts and a per-rank memory estimate, computed on the meta device (no memory used)."""
from __future__ import annotations

import math

import torch

from hecate.models.transformer import MoETransformer


def build_meta_model(model_cfg) -> MoETransformer:
    """The model with meta tensors: shapes only, so paper-size configs build in seconds."""
    with torch.device("meta"):
        return MoETransformer(model_cfg)


def param_counts(model: MoETransformer) -> dict:
    """total_params, routed expert params, and active_params (per token: all non-routed params
    plus top_k of each MoE layer's routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    routed, active_routed = 0, 0
    for layer in model.moe_layers():
        n = sum(p.numel() for p in layer.experts.parameters())
        routed += n
        active_routed += n * layer.config.top_k // layer.config.num_experts
    return {"total_params": total, "routed_expert_params": routed,
            "dense_params": total - routed, "active_params": total - routed + active_routed}


def memory_estimate(cfg, world: int, counts: dict) -> dict:
    """Bytes per rank for parameters + gradients + AdamW state (fp32: 4 + 4 + 8 per element),
    plus the transient full expert weights of one layer a strategy materializes, plus a rough
    activation term. An estimate, not a measurement."""
    dense, routed = counts["dense_params"], counts["routed_expert_params"]
    p = cfg.parallel
    n_moe = max(1, len(build_meta_model(cfg.model).moe_layers())) if routed else 1
    per_layer = routed // n_moe if routed else 0
    E = cfg.model.moe.num_experts
    if p.strategy in ("local", "dp"):
        kept, transient = routed, 0
    elif p.strategy == "ep":
        kept, transient = routed // (p.ep_size or world), 0
    elif p.strategy == "fsdp":
        kept, transient = math.ceil(routed / world), per_layer
    else:  # fssdp: owned chunks + up to memory_slots materialized chunks of one layer
        slots = p.fssdp.memory_slots or math.ceil(E / world)
        kept, transient = math.ceil(routed / world), per_layer * min(E, math.ceil(E / world) + slots) // E
    state = 16 * (dense + kept)
    m, d = cfg.model, cfg.data
    tokens = d.batch_size * d.seq_len
    activations = 4 * tokens * (m.n_layers * m.d_model * 16 + 2 * m.vocab_size)
    return {"world_size": world, "strategy": p.strategy, "param_state_bytes": state,
            "transient_expert_bytes": 4 * transient, "activation_bytes": activations,
            "total_bytes": state + 4 * transient + activations}
