"""A decoder-only transformer whose feed-forward blocks may be MoE layers.

This is the GPT-MoE skeleton the strategies, the trainer and the tests share;
the model zoo builds its variants from the same blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer


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

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.moe.hidden_size != self.d_model:
            raise ValueError(f"model.moe.hidden_size ({self.moe.hidden_size}) must equal model.d_model ({self.d_model})")
        if self.moe_every < 1:
            raise ValueError(f"model.moe_every must be >= 1, got {self.moe_every}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        self.moe.validate()

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i + 1) % self.moe_every == 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, S, D))


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, moe: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.norm2 = RMSNorm(cfg.d_model)
        self.ffn = MoELayer(cfg.moe) if moe else DenseMLP(cfg.d_model, cfg.dense_ffn_hidden)

    def forward(self, x, aux: list, stats: list):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h)
            aux.append(out.aux_loss)
            stats.append(out.stats)
            return x + out.y
        return x + self.ffn(h)


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
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 1.0 / math.sqrt(self.cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "ffn.experts" not in name and "router" not in name:
                nn.init.normal_(p, std=std)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BS) + self.pos(torch.arange(S, device=tokens_BS.device))
        aux, stats = [], []
        for block in self.blocks:
            x = block(x, aux, stats)
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        aux_loss = torch.stack(aux).sum() if aux else x.new_zeros(())
        return ModelOutput(logits, aux_loss, stats)

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        out = self(tokens_BS)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets_BS.flatten())
        return lm + out.aux_loss, out
