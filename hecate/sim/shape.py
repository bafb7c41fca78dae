"""The numbers of a model the step simulator needs, read off the model itself.

A `ModelShape` is built from a model-zoo preset name or a TransformerConfig by
constructing the real MoETransformer on the meta device (no memory) and counting
its parameters, so the simulator and `hecate inspect` see the same model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    d_model: int
    n_layers: int
    moe_layers: tuple[int, ...]      # block indices whose FFN is an MoELayer
    num_experts: int                 # routed experts per MoE layer (the first MoE layer's)
    top_k: int
    chunk_numel: int                 # parameters of one routed expert (one chunk)
    dense_params: int                # every parameter outside the routed experts
    matmul_params: int               # dense parameters used in a matmul per token (no embeddings)
    vocab_size: int
    seq_len: int
    attn_width: int                  # n_heads x head_dim (width of Q, K and V)

    @property
    def routed_params(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.chunk_numel

    def dense_flops_per_token(self) -> float:
        """Forward FLOPs of everything but the routed experts, per token: 2 per matmul parameter,
        causal attention scores and values (2 x 2 x seq/2 x width per layer), the LM head."""
        attn = self.n_layers * 2 * self.seq_len * self.attn_width
        return 2.0 * self.matmul_params + attn + 2.0 * self.d_model * self.vocab_size

    def expert_flops_per_entry(self) -> float:
        """Forward FLOPs of one routed (token, expert) entry: 2 per expert parameter."""
        return 2.0 * self.chunk_numel


def shape_of_config(model_cfg, name: str = "custom", seq_len: int | None = None) -> ModelShape:
    """ModelShape of a hecate TransformerConfig (built on the meta device)."""
    from hecate.train.model_stats import build_meta_model

    model = build_meta_model(model_cfg)
    layers = list(model.moe_layers())
    if not layers:
        raise ValueError(f"model {name!r} has no MoE layer; the simulator models MoE training")
    counts = {layer.config.num_experts for layer in layers}
    if len(counts) > 1:
        raise ValueError(f"model {name!r} has MoE layers with different expert counts {sorted(counts)} "
                         "(a PR-MoE pyramid); the simulator needs one expert count per model")
    first = layers[0]
    E = first.config.num_experts
    chunk = sum(p.numel() for p in first.experts.parameters()) // E
    total = sum(p.numel() for p in model.parameters())
    routed = sum(sum(p.numel() for p in layer.experts.parameters()) for layer in layers)
    embed = sum(m.weight.numel() for m in model.modules()
                if type(m).__name__ == "Embedding" and hasattr(m, "weight"))
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
    moe_idx = tuple(i for i in range(model_cfg.n_layers) if model_cfg.is_moe_layer(i))
    return ModelShape(name=name, d_model=model_cfg.d_model, n_layers=model_cfg.n_layers, moe_layers=moe_idx,
                      num_experts=E, top_k=first.config.top_k, chunk_numel=chunk, dense_params=total - routed,
                      matmul_params=max(total - routed - embed, 0), vocab_size=model_cfg.vocab_size,
                      seq_len=seq_len or model_cfg.max_seq_len, attn_width=model_cfg.n_heads * head_dim)


def shape_of_preset(name: str, seq_len: int | None = None) -> ModelShape:
    """ModelShape of a model-zoo preset (`hecate inspect --list` names them)."""
    from hecate.models.registry import get_preset, make_config

    preset = get_preset(name)
    if preset.arch != "transformer":
        raise ValueError(f"preset {name!r} is a {preset.arch!r} model; the simulator models "
                         "transformer presets (e.g. gpt-moe-s, gpt-moe-l, deepseekmoe-16b)")
    return shape_of_config(make_config(preset.arch, preset.config), name, seq_len)
