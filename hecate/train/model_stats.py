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
            "dense_params": total - routed, "active_params": total - routed + active_routed,
            **attention_flops(model)}


def attention_flops(model: MoETransformer) -> dict:
    """Forward FLOPs of the attention cores (QK^T and PV; projections excluded) for one
    sequence of model.max_seq_len tokens: every head's (attention_flops_per_seq) and the heads
    that run (active_attention_flops_per_seq: MoH computes only shared + top_k heads per token)."""
    from hecate.models.attention import BAMAttention, LightningAttention, MoHAttention

    S = getattr(model.cfg, "max_seq_len", 0)  # other zoo architectures (hecate.train.tasks): no attention
    dense = active = 0
    for block in getattr(model, "blocks", []):
        attn = getattr(block, "attn", None)
        if attn is None or not S:
            continue
        heads = attn.n_heads * attn.num_experts if isinstance(attn, BAMAttention) else getattr(attn, "n_heads", 0)
        d = getattr(attn, "head_dim", 0)
        if isinstance(attn, LightningAttention):  # intra-block causal products + the d x d state
            b = min(attn.block_size, S)
            per_head = 2 * d * S * (b + 1) + 4 * S * d * d
        elif hasattr(attn, "v_dim"):  # MLA: q.k over nope + rope dims, p.v over v_dim
            per_head = S * (S + 1) * (attn.nope_dim + attn.rope_dim + attn.v_dim)
        else:  # causal softmax attention: S (S + 1) / 2 query-key pairs, 2 FLOPs x d twice
            per_head = 2 * d * S * (S + 1)
        dense += heads * per_head
        share = attn.active_head_share() if isinstance(attn, MoHAttention) else 1.0
        active += round(heads * per_head * share)
    return {"attention_flops_per_seq": dense, "active_attention_flops_per_seq": active}


def expert_state_estimate(model, strategy: str, world: int, ep_size: int | None = None,
                          memory_slots: int | None = None, dense_optimizer: str = "auto") -> dict:
    """Bytes per rank of parameters + gradients + AdamW state (fp32: 4 + 4 + 8 per element) for any
    model with MoELayers, plus the transient full expert weights of one layer the strategy
    materializes. Dense parameters are replicated, their AdamW state too unless the dense optimizer
    is sharded (parallel.dense_optimizer; "auto" shards it under fssdp); routed experts are kept
    whole (local, dp), split over the EP group (ep), or sharded over the world (fsdp, fssdp).
    Works on meta models."""
    from hecate.moe.layer import MoELayer

    total = sum(p.numel() for p in model.parameters())
    routed = kept = transient = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        n, E = sum(p.numel() for p in layer.experts.parameters()), layer.config.num_experts
        routed += n
        if strategy in ("local", "dp"):
            kept += n
        elif strategy == "ep":
            kept += n // (ep_size or world)
        elif strategy == "fsdp":
            kept += math.ceil(n / world)
            transient = max(transient, n)
        else:  # fssdp: owned chunks + up to memory_slots materialized chunks of one layer
            slots = memory_slots or math.ceil(E / world)
            kept += math.ceil(n / world)
            transient = max(transient, n * min(E, math.ceil(E / world) + slots) // E)
    sharded = dense_optimizer == "sharded" or (dense_optimizer == "auto" and strategy == "fssdp")
    dense = total - routed
    # fp32 param + grad (4 + 4) per dense element, AdamW's two moments (8) on 1/W when sharded.
    dense_bytes = 8 * dense + (math.ceil(8 * dense / world) if sharded and world > 1 else 8 * dense)
    state = 16 * kept + dense_bytes
    return {"world_size": world, "strategy": strategy, "param_state_bytes": state,
            "transient_expert_bytes": 4 * transient, "total_bytes": state + 4 * transient}


def memory_estimate(cfg, world: int, counts: dict | None = None) -> dict:
    """expert_state_estimate for a TrainConfig's model and parallel section, plus a rough
    activation term for one micro-batch. An estimate, not a measurement."""
    p = cfg.parallel
    est = expert_state_estimate(build_meta_model(cfg.model), p.strategy, world, p.ep_size,
                                p.fssdp.memory_slots, p.dense_optimizer)
    m, d = cfg.model, cfg.data
    tokens = d.batch_size * d.seq_len
    activations = 4 * tokens * (m.n_layers * m.d_model * 16 + 2 * m.vocab_size)
    return {**est, "activation_bytes": activations, "total_bytes": est["total_bytes"] + activations}
