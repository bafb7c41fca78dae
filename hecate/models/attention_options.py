"""Attention forms of pretrained checkpoints (Hugging Face Llama / Qwen / OLMoE / DeepSeek-V3):

- `NormedAttention`: multi-head / grouped-query attention with optional biases on the
  q/k/v projection (`qkv_bias`, Qwen2) and on the output (`out_bias`, Llama's
  attention_bias) and an optional RMSNorm on queries and keys before RoPE (`qk_norm`):
  "head" normalizes each head's d values (Qwen3), "full" the whole projection of all
  heads (OLMoE).
- `MLAttention`: DeepSeek-V2/V3 multi-head latent attention. Queries come from a low-rank
  path (q_a -> RMSNorm -> q_b) or one projection; keys and values from one shared latent
  (kv_a -> RMSNorm -> kv_b) plus a single rotary key shared by all heads.

Both are dense modules (replicated, data parallel under every strategy) with the
interface of `hecate.models.attention.Attention`: forward(x_BSD, rope) -> y_BSD.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.attention import Attention, Rope, apply_rope, causal_attention

QK_NORMS = ("none", "head", "full")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim, computed in fp32 and cast back (as Llama does)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class NormWeight(nn.Module):
    """An RMSNorm scale vector (parameter `weight`) with its epsilon."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class NormedAttention(Attention):
    """Attention with projection biases and query/key RMSNorm (see the module doc)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, qkv_bias: bool = False, out_bias: bool = False,
                 qk_norm: str = "none", norm_eps: float = 1e-6):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim)
        if qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm={qk_norm!r} must be one of {QK_NORMS}")
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        if qkv_bias:
            self.qkv = nn.Linear(d_model, (H + 2 * G) * d, bias=True)
        if out_bias:
            self.out = nn.Linear(H * d, d_model, bias=True)
        self.qk_norm = qk_norm
        self.q_norm = self.k_norm = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = NormWeight(d, norm_eps), NormWeight(d, norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = NormWeight(H * d, norm_eps), NormWeight(G * d, norm_eps)

    def project(self, x_BSD, rope: Optional[Rope]):
        B, S, _ = x_BSD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * d, G * d, G * d], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, H, d), k.view(B, S, G, d), v.view(B, S, G, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's interleaved rotary pairs
    become the half-split pairs apply_rope rotates (same angle per pair, same dot products)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), causal, every head its own query.

    Per head: q = [q_nope (nope_dim) | q_rope (rope_dim)], k = [k_nope | k_rope (shared by
    all heads)], v (v_dim); scale (nope_dim + rope_dim)^-1/2 times softmax_scale. RoPE rotates the rope parts
    only; `head_dim` is that rotary width (what the model's RoPE tables are built for).
    Parameters: q_proj (q_lora_rank None) or q_a / q_a_norm / q_b; kv_a, kv_a_norm, kv_b; out.
    """

    def __init__(self, d_model: int, n_heads: int, *, q_lora_rank: Optional[int], kv_lora_rank: int,
                 nope_dim: int, rope_dim: int, v_dim: int, bias: bool = False, rope_interleave: bool = True,
                 latent_norm_eps: float = 1e-6, softmax_scale: float = 1.0):
        super().__init__()
        for name, v in (("n_heads", n_heads), ("mla_kv_lora_rank", kv_lora_rank), ("mla_v_head_dim", v_dim),
                        ("mla_qk_rope_head_dim", rope_dim)):
            if v < 1:
                raise ValueError(f"model.{name} must be >= 1 for attention='mla', got {v}")
        if nope_dim < 0 or rope_dim % 2:
            raise ValueError(f"model.mla_qk_nope_head_dim ({nope_dim}) must be >= 0 and "
                             f"model.mla_qk_rope_head_dim ({rope_dim}) even")
        if q_lora_rank is not None and q_lora_rank < 1:
            raise ValueError(f"model.mla_q_lora_rank must be >= 1 or None, got {q_lora_rank}")
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim = n_heads, nope_dim, rope_dim, v_dim
        self.head_dim = rope_dim
        self.kv_lora_rank, self.rope_interleave = kv_lora_rank, rope_interleave
        self.softmax_scale = softmax_scale  # times (nope + rope)^-1/2 (DeepSeek yarn mscale^2)
        qk = nope_dim + rope_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * qk, bias=False)
            self.q_a = self.q_a_norm = self.q_b = None
        else:
            self.q_proj = None
            self.q_a = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_norm = NormWeight(q_lora_rank, latent_norm_eps)
            self.q_b = nn.Linear(q_lora_rank, n_heads * qk, bias=False)
        self.kv_a = nn.Linear(d_model, kv_lora_rank + rope_dim, bias=bias)
        self.kv_a_norm = NormWeight(kv_lora_rank, latent_norm_eps)
        self.kv_b = nn.Linear(kv_lora_rank, n_heads * (nope_dim + v_dim), bias=False)
        self.out = nn.Linear(n_heads * v_dim, d_model, bias=bias)

    def project(self, x_BSD, rope: Optional[Rope]):
        """q_BHSq, k_BHSq (q/k width nope_dim + rope_dim, the rope part rotated, q times
        softmax_scale) and v_BHSv (contiguous): per-head keys and values after the latent
        up-projection (shared with the KV-cache decoder)."""
        if rope is None:
            raise ValueError("attention='mla' needs rotary positions: set model.rope=true")
        B, S, _ = x_BSD.shape
        H = self.n_heads
        q = self.q_proj(x_BSD) if self.q_proj is not None else self.q_b(self.q_a_norm(self.q_a(x_BSD)))
        q_BHSq = q.view(B, S, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BHSq.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_BHSx = self.kv_b(self.kv_a_norm(latent)).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv_BHSx.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope.view(B, 1, S, self.rope_dim)
        if self.rope_interleave:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope, k_rope = apply_rope(q_rope, rope), apply_rope(k_rope, rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        if self.softmax_scale != 1.0:
            q = q * self.softmax_scale
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)
        return q, k, v.contiguous()

    def forward(self, x_BSD, rope: Optional[Rope] = None):
        B, S, _ = x_BSD.shape
        q, k, v = self.project(x_BSD, rope)
        o_BSHv = causal_attention(q, k, v).transpose(1, 2)
        return self.out(o_BSHv.reshape(B, S, self.n_heads * self.v_dim))

    def inactive_parameters(self) -> int:
        return 0
