"""A decoder-only transformer whose feed-forward blocks may be MoE layers.

This is the GPT-MoE skeleton the strategies, the trainer and the tests share. The
language models of the zoo (GPT-MoE, DeepSpeed PR-MoE, DeepSeekMoE, MoH, BAM) are all
configurations of it: per-layer expert counts, residual/shared experts (MoEConfig),
SwiGLU, RoPE, grouped-query attention, MoH or BAM attention, parallel blocks. The
defaults are the original GPT-MoE skeleton (learned positions, GeLU, MHA, tied head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.attention import (Attention, BAMAttention, LightningAttention, MoHAttention, check_heads,
                                     rope_tables)
from hecate.models.attention_options import QK_NORMS, MLAttention, NormedAttention
from hecate.models.checkpointing import checkpointed_block, checkpointing_active
from hecate.models.rope_scaling import check_rope_scaling, scaled_rope_tables, softmax_scale_multiplier
from hecate.models.mohd import MoHDFFN, check_mohd
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer

ATTENTIONS = ("mha", "moh", "bam", "mla", "lightning")
DENSE_ACTIVATIONS = ("gelu", "swiglu")


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    dense_ffn_hidden: int = 128
    moe_every: int = 2          # layer i is MoE when (i + 1) % moe_every == 0
    first_dense_layers: int = 0  # DeepSeekMoE keeps the first layer(s) dense
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(hidden_size=64, ffn_hidden_size=64,
                                                             num_experts=4, top_k=2))
    # --- zoo extensions (defaults keep the skeleton above) ---
    moe_experts_per_layer: Optional[list] = None  # PR-MoE pyramid: experts of each MoE layer, in order
    dense_activation: str = "gelu"                # dense FFN: gelu | swiglu
    n_kv_heads: Optional[int] = None              # grouped-query attention (None = n_heads)
    head_dim: Optional[int] = None                # None = d_model // n_heads
    rope: bool = False                            # rotary positions instead of learned ones
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None           # linear | llama3 | yarn frequency scaling (models/rope_scaling.py)
    attention: str = "mha"                        # mha | moh | bam | mla | lightning
    parallel_block: bool = False                  # BAM: x + attn(n(x)) + ffn(n(x))
    moh_shared_heads: int = 0                     # MoH: always-on heads (the first ones)
    moh_top_k: Optional[int] = None               # MoH: routed heads per token (None = all)
    moh_router: str = "learned"                   # MoH: learned | query_norm (parameter-free)
    moh_balance_coeff: float = 0.01               # MoH: head load-balance loss weight
    bam_attention_experts: int = 1                # BAM: attention branches (soft-routed)
    bam_shared_kv: bool = False                   # BAM: branches share one K/V projection
    lightning_block_size: int = 64                # lightning: tokens per intra-block tile
    mohd_sub_dims: int = 0                        # MoHD: dense FFNs split into this many sub-dimensions (0 = off)
    mohd_shared: int = 0                          # MoHD: always-on sub-dimensions (the first ones)
    mohd_top_k: int = 1                           # MoHD: routed sub-dimensions per token
    mohd_balance_coeff: float = 0.01              # MoHD: routed sub-dimension balance loss weight
    mohd_fusion: bool = True                      # MoHD: per-group fusion map (hecate.models.mohd)
    # --- pretrained-checkpoint forms (hecate.integrations.hf); defaults change nothing ---
    norm_eps: float = 1e-6                        # epsilon of every RMSNorm of the blocks and the final norm
    moe_layers: Optional[list] = None             # explicit MoE layer indices (replaces moe_every/first_dense_layers)
    qkv_bias: bool = False                        # mha: bias on the q/k/v projection (Qwen2)
    out_bias: bool = False                        # mha: output-projection bias; mla: bias of q_a, kv_a, out
    qk_norm: str = "none"                         # mha: none | head (Qwen3) | full (OLMoE) RMSNorm of q and k
    mla_q_lora_rank: Optional[int] = None         # mla: query low-rank width (None = one q projection)
    mla_kv_lora_rank: int = 0                     # mla: key/value latent width
    mla_qk_nope_head_dim: int = 0                 # mla: per-head query/key width without RoPE
    mla_qk_rope_head_dim: int = 0                 # mla: per-head rotary width (must equal head_dim)
    mla_v_head_dim: int = 0                       # mla: per-head value width
    mla_rope_interleave: bool = True              # mla: rotary pairs are interleaved (DeepSeek layout)
    # --- training memory ---
    activation_checkpointing: bool = False        # recompute blocks in backward (models/checkpointing.py)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.moe.hidden_size != self.d_model:
            raise ValueError(f"model.moe.hidden_size ({self.moe.hidden_size}) must equal model.d_model ({self.d_model})")
        if self.moe_every < 1:
            raise ValueError(f"model.moe_every must be >= 1, got {self.moe_every}")
        if self.first_dense_layers < 0:
            raise ValueError(f"model.first_dense_layers must be >= 0, got {self.first_dense_layers}")
        _, hd = check_heads(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim)
        if self.rope and hd % 2:
            raise ValueError(f"model.rope needs an even head dim, got {hd}; change model.head_dim or n_heads")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"model.attention={self.attention!r} must be one of {ATTENTIONS}")
        if self.dense_activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"model.dense_activation={self.dense_activation!r} must be one of {DENSE_ACTIVATIONS}")
        if self.moh_balance_coeff < 0:
            raise ValueError(f"model.moh_balance_coeff must be >= 0, got {self.moh_balance_coeff}")
        if self.attention == "moh":
            routed = self.n_heads - self.moh_shared_heads
            if not 0 <= self.moh_shared_heads < self.n_heads:
                raise ValueError(f"model.moh_shared_heads ({self.moh_shared_heads}) must be in "
                                 f"[0, n_heads={self.n_heads}) so that at least one head is routed")
            if self.moh_top_k is not None and not 1 <= self.moh_top_k <= routed:
                raise ValueError(f"model.moh_top_k ({self.moh_top_k}) must be in [1, {routed}] "
                                 f"(n_heads - moh_shared_heads)")
            if self.moh_router not in ("learned", "query_norm"):
                raise ValueError(f"model.moh_router={self.moh_router!r} must be 'learned' or 'query_norm'")
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and not self.rope:
            raise ValueError("model.rope_scaling needs model.rope=true")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm={self.qk_norm!r} must be one of {QK_NORMS}")
        if (self.qkv_bias or self.qk_norm != "none") and self.attention != "mha":
            raise ValueError("model.qkv_bias / qk_norm apply to attention='mha' only, "
                             f"got attention={self.attention!r}")
        if self.out_bias and self.attention not in ("mha", "mla"):
            raise ValueError(f"model.out_bias applies to attention='mha' or 'mla', got {self.attention!r}")
        if self.attention == "mla":
            if not self.rope or self.parallel_block:
                raise ValueError("attention='mla' needs model.rope=true and model.parallel_block=false")
            if self.mla_qk_rope_head_dim != hd:
                raise ValueError(f"attention='mla': model.head_dim ({hd}) must equal model.mla_qk_rope_head_dim "
                                 f"({self.mla_qk_rope_head_dim}), the width the RoPE tables are built for")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if isinstance(i, bool) or not isinstance(i, int)
                   or not 0 <= i < self.n_layers]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"model.moe_layers must list distinct layer indices in [0, n_layers="
                                 f"{self.n_layers}), got {self.moe_layers!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"model.activation_checkpointing must be true or false, "
                             f"got {self.activation_checkpointing!r}")
        if self.lightning_block_size < 1:
            raise ValueError(f"model.lightning_block_size must be >= 1, got {self.lightning_block_size}")
        if self.bam_attention_experts < 1:
            raise ValueError(f"model.bam_attention_experts must be >= 1, got {self.bam_attention_experts}")
        if self.mohd_sub_dims:
            check_mohd(self.dense_ffn_hidden, self.mohd_sub_dims, self.mohd_shared, self.mohd_top_k,
                       self.mohd_balance_coeff, self.dense_activation)
        n_moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        if self.moe_experts_per_layer is not None:
            counts = self.moe_experts_per_layer
            if not isinstance(counts, (list, tuple)) or len(counts) != n_moe:
                raise ValueError(f"model.moe_experts_per_layer must list one expert count per MoE layer "
                                 f"({n_moe} MoE layers with n_layers={self.n_layers}, moe_every={self.moe_every}, "
                                 f"first_dense_layers={self.first_dense_layers}), got {counts!r}")
            for j, e in enumerate(counts):
                if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                    raise ValueError(f"model.moe_experts_per_layer[{j}] must be a positive int, got {e!r}")
                try:
                    self.moe.replace(num_experts=e).validate()
                except ValueError as err:
                    raise ValueError(f"model.moe_experts_per_layer[{j}]={e}: {err}") from None
        self.moe.validate()

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

    def moe_config(self, i: int) -> MoEConfig:
        """The MoEConfig of layer i (which must be an MoE layer): model.moe with the
        layer's own expert count when model.moe_experts_per_layer is set."""
        if not self.is_moe_layer(i):
            raise ValueError(f"layer {i} is not an MoE layer")
        if self.moe_experts_per_layer is None:
            return self.moe
        j = sum(self.is_moe_layer(t) for t in range(i))
        return self.moe.replace(num_experts=self.moe_experts_per_layer[j])


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, in x's dtype; the KV-cached decoder calls this module
    too. Not F.rms_norm: on the CPU that is bit-identical in fp32 / fp64 but computes bf16 / fp16
    inputs in fp32 (other roundings), and the model's numbers must not change with the path."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DenseMLP(nn.Module):
    """fc2(gelu(fc1 x)), or fc2(silu(fc1 x) * fc3 x) for swiglu."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.fc3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None

    def forward(self, x):
        if self.fc3 is not None:
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(F.gelu(self.fc1(x)))


def build_attention(cfg: TransformerConfig) -> nn.Module:
    """The attention block cfg.attention names (see hecate.models.attention)."""
    if cfg.attention == "moh":
        return MoHAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            n_shared=cfg.moh_shared_heads, top_k=cfg.moh_top_k,
                            router=cfg.moh_router, balance_coeff=cfg.moh_balance_coeff)
    if cfg.attention == "bam":
        return BAMAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            num_experts=cfg.bam_attention_experts, shared_kv=cfg.bam_shared_kv)
    if cfg.attention == "lightning":
        return LightningAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                  block_size=cfg.lightning_block_size, eps=cfg.norm_eps)
    if cfg.attention == "mla":
        return MLAttention(cfg.d_model, cfg.n_heads, q_lora_rank=cfg.mla_q_lora_rank,
                           kv_lora_rank=cfg.mla_kv_lora_rank, nope_dim=cfg.mla_qk_nope_head_dim,
                           rope_dim=cfg.mla_qk_rope_head_dim, v_dim=cfg.mla_v_head_dim, bias=cfg.out_bias,
                           rope_interleave=cfg.mla_rope_interleave,
                           softmax_scale=softmax_scale_multiplier(cfg.rope_scaling))
    if cfg.qkv_bias or cfg.out_bias or cfg.qk_norm != "none":
        return NormedAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias,
                               out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps)
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)


class Block(nn.Module):
    """Pre-norm block: sequential (x += attn; x += ffn) or parallel (both read norm1(x))."""

    def __init__(self, cfg: TransformerConfig, moe: bool, moe_config: Optional[MoEConfig] = None):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.norm2 = None if self.parallel else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = (MoELayer(moe_config or cfg.moe) if moe
                    else MoHDFFN(cfg.d_model, cfg.dense_ffn_hidden, cfg.mohd_sub_dims, cfg.mohd_shared,
                                 cfg.mohd_top_k, cfg.dense_activation, cfg.mohd_balance_coeff, cfg.mohd_fusion)
                    if cfg.mohd_sub_dims else DenseMLP(cfg.d_model, cfg.dense_ffn_hidden, cfg.dense_activation))

    def _attend(self, h, rope, aux: list):
        out = self.attn(h, rope)
        if isinstance(out, tuple):  # attention with an aux loss (MoH head balance)
            out, attn_aux = out
            aux.append(attn_aux)
        return out

    def _ffn(self, h, aux: list, stats: list):
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h)
            aux.append(out.aux_loss)
            stats.append(out.stats)
            return out.y
        out = self.ffn(h)
        if isinstance(out, tuple):  # an FFN with an aux loss (MoHD sub-dimension balance)
            out, ffn_aux = out
            aux.append(ffn_aux)
        return out

    def forward(self, x, aux: list, stats: list, rope=None):
        if self.parallel:
            h = self.norm1(x)
            return x + self._attend(h, rope, aux) + self._ffn(h, aux, stats)
        x = x + self._attend(self.norm1(x), rope, aux)
        return x + self._ffn(self.norm2(x), aux, stats)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list


class MoETransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = None if cfg.rope else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.is_moe_layer(i), cfg.moe_config(i) if cfg.is_moe_layer(i) else None)
            for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 1.0 / math.sqrt(self.cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "ffn.experts" not in name and "router" not in name:
                nn.init.normal_(p, std=std)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def active_parameters(self) -> int:
        """Parameters used per token: everything except the routed experts a token skips
        (top_k of E per MoE layer) and, for MoH, the query/output slices of skipped heads."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers():
            n = sum(p.numel() for p in layer.experts.parameters())
            inactive += n - n * layer.config.top_k // layer.config.num_experts
        for block in self.blocks:
            inactive += block.attn.inactive_parameters()
            if isinstance(block.ffn, MoHDFFN):
                inactive += block.ffn.inactive_parameters()
        return total - inactive

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BS)
        rope = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(S, device=tokens_BS.device))
        else:
            hd = self.blocks[0].attn.head_dim
            if self.cfg.rope_scaling is None:
                rope = rope_tables(S, hd, self.cfg.rope_theta, device=tokens_BS.device)
            else:
                rope = scaled_rope_tables(S, hd, self.cfg.rope_theta, self.cfg.rope_scaling, device=tokens_BS.device)
        aux, stats = [], []
        recompute = self.cfg.activation_checkpointing and checkpointing_active(self)
        for block in self.blocks:
            x = checkpointed_block(block, x, aux, stats, rope) if recompute else block(x, aux, stats, rope)
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        aux_loss = torch.stack([a.float() for a in aux]).sum() if aux else x.new_zeros(())
        return ModelOutput(logits, aux_loss, stats)

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        out = self(tokens_BS)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets_BS.flatten())
        return lm + out.aux_loss, out
