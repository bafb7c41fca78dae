"""KV-cached decoding of an MoETransformer for a batch of prompts of different lengths.

Prompts are left-padded to one length P; each row has its own positions (pad slots masked out
of every key set, real tokens at positions 0, 1, ...), so a row computes what the model computes
on that prompt alone. The first logits() call runs the prompts once (prefill) and stores each
attention block's keys and values; every later call feeds only the newest token of each row.

Attention types: multi-head / grouped-query (incl. the q/k-norm and bias forms), MoH (gates
applied per head, as in its SDPA path), BAM attention experts (a cache per branch, or one
shared K/V), MLA (per-head keys and values after the latent up-projection) and Lightning
attention (a per-head key-value state instead of a growing cache). Blocks and MoE layers run
their own modules (routing overrides apply as in the uncached model).

When a row would pass model.max_seq_len, the cache is rebuilt from each row's last
max_seq_len tokens, which is what the uncached decoder sees (a sliding window).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hecate.models.attention import Attention, BAMAttention, LightningAttention, MoHAttention, rope_tables
from hecate.models.attention_options import MLAttention
from hecate.models.rope_scaling import scaled_rope_tables
from hecate.models.transformer import MoETransformer
from hecate.moe.overrides import routing_overrides


def _attend(q_BHSd, k_BGKd, v_BGKd, mask_BSK, scale=None) -> torch.Tensor:
    """Softmax attention of the new queries over the cached keys; mask_BSK True = may attend."""
    rep = q_BHSd.shape[1] // k_BGKd.shape[1]
    if rep > 1:
        k_BGKd, v_BGKd = k_BGKd.repeat_interleave(rep, 1), v_BGKd.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q_BHSd, k_BGKd, v_BGKd, attn_mask=mask_BSK[:, None], scale=scale)


class KVState:
    """Keys/values (or a linear-attention state) of one attention block, keyed by name."""

    def __init__(self):
        self.kv: dict = {}

    def extend(self, name: str, k, v):
        if name in self.kv:
            k0, v0 = self.kv[name]
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)
        self.kv[name] = (k, v)
        return k, v


def _mha(attn: Attention, h, rope, state: KVState, mask, name="") -> torch.Tensor:
    B, S, _ = h.shape
    q, k, v = attn.project(h, rope)
    k, v = state.extend(name, k, v)
    return _attend(q, k, v, mask).transpose(1, 2)  # [B, S, H, d]


def _moh(attn: MoHAttention, h, rope, state: KVState, mask) -> torch.Tensor:
    B, S, _ = h.shape
    q, k, v = attn.project(h, rope)
    g_TH, _, _ = attn.route_heads(h, q)
    k, v = state.extend("", k, v)
    o = _attend(q, k, v, mask).transpose(1, 2)
    return attn.out((o * g_TH.view(B, S, -1, 1).to(o.dtype)).reshape(B, S, -1))


def _bam(attn: BAMAttention, h, rope, state: KVState, mask) -> torch.Tensor:
    B, S, D = h.shape
    w = torch.softmax(F.linear(h.float(), attn.router.weight.float()), -1).to(h.dtype)
    ys = []
    if not attn.shared_kv:
        for n, branch in enumerate(attn.branches):
            ys.append(branch.out(_mha(branch, h, rope, state, mask, str(n)).reshape(B, S, -1)))
    else:
        qs, k, v = attn.shared_project(h, rope)
        k, v = state.extend("", k, v)
        for branch, q in zip(attn.branches, qs):
            ys.append(branch.out(_attend(q, k, v, mask).transpose(1, 2).reshape(B, S, -1)))
    y = ys[0] * w[..., 0:1]
    for n in range(1, attn.num_experts):
        y = y + ys[n] * w[..., n:n + 1]
    return y


def _mla(attn: MLAttention, h, rope, state: KVState, mask) -> torch.Tensor:
    B, S, _ = h.shape
    q, k, v = attn.project(h, rope)
    k, v = state.extend("", k, v)
    o = _attend(q, k, v, mask).transpose(1, 2)
    return attn.out(o.reshape(B, S, attn.n_heads * attn.v_dim))


def _lightning(attn: LightningAttention, h, rope, state: KVState, real_BS) -> torch.Tensor:
    """o_t = q_t S_t, S_t = decay S_{t-1} + k_t^T v_t (pad slots add nothing), token by token."""
    B, S, _ = h.shape
    H, d = attn.n_heads, attn.head_dim
    q, k, v = attn.project(h, rope)
    k = k * real_BS[:, None, :, None].to(k.dtype)
    s_BHdd = state.kv.get("state")
    if s_BHdd is None:
        s_BHdd = q.new_zeros(B, H, d, d, dtype=torch.float32)
    decay = attn.decay.float()[None, :, None, None]
    outs = []
    for t in range(S):
        s_BHdd = decay * s_BHdd + k[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t].float(), s_BHdd))
    state.kv["state"] = s_BHdd
    o = torch.stack(outs, 2)
    o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + attn.eps)).to(h.dtype)
    return attn.out(o.transpose(1, 2).reshape(B, S, -1))


def attend_cached(attn, h, rope, state: KVState, mask_BSK, real_BS) -> torch.Tensor:
    """One attention block on the new rows h [B, S, D], extending `state`."""
    B, S, _ = h.shape
    if isinstance(attn, MoHAttention):
        return _moh(attn, h, rope, state, mask_BSK)
    if isinstance(attn, Attention):
        return attn.out(_mha(attn, h, rope, state, mask_BSK).reshape(B, S, -1))
    if isinstance(attn, BAMAttention):
        return _bam(attn, h, rope, state, mask_BSK)
    if isinstance(attn, MLAttention):
        return _mla(attn, h, rope, state, mask_BSK)
    if isinstance(attn, LightningAttention):
        return _lightning(attn, h, rope, state, real_BS)
    raise ValueError(f"no KV cache for attention {type(attn).__name__}; generate with use_cache=False (--no-cache)")


class CachedDecoder:
    """KV-cached decoder with the interface of hecate.inference.sampling.FullDecoder."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], overrides: Sequence[dict] = ()):
        if not isinstance(model, MoETransformer):
            raise ValueError(f"the KV cache decodes MoETransformer models, not {type(model).__name__}; "
                             "generate with use_cache=False (--no-cache)")
        self.model, self.overrides = model, list(overrides)
        self.seqs = [list(p) for p in prompts]
        self.device = next(model.parameters()).device
        self.window = model.cfg.max_seq_len
        self.states: Optional[list] = None
        self.fed = 0  # tokens of each row already in the cache (since the last prefill)
        cfg = model.cfg
        self.rope = None
        if model.pos is None:
            hd = model.blocks[0].attn.head_dim
            self.rope = (rope_tables(self.window, hd, cfg.rope_theta, device=self.device)
                         if cfg.rope_scaling is None else
                         scaled_rope_tables(self.window, hd, cfg.rope_theta, cfg.rope_scaling, device=self.device))

    def context(self):
        stack = contextlib.ExitStack()
        for kw in self.overrides:
            stack.enter_context(routing_overrides(self.model, **kw))
        return stack

    def _prefill(self):
        ctx = [s[-self.window:] for s in self.seqs]
        P = max(len(c) for c in ctx)
        self.pad = torch.tensor([P - len(c) for c in ctx], device=self.device)
        tokens = torch.tensor([[0] * (P - len(c)) + c for c in ctx], device=self.device)
        slots = torch.arange(P, device=self.device)
        real_BK = slots[None] >= self.pad[:, None]
        self.real_BK = real_BK
        # query i may attend key j <= i of its row's real tokens (a pad query: itself, never used)
        mask = (slots[None, :, None] >= slots[None, None, :]) & (real_BK[:, None, :] | torch.eye(
            P, dtype=torch.bool, device=self.device)[None])
        self.lengths = [len(c) for c in ctx]
        self.states = [KVState() for _ in self.model.blocks]
        pos = (slots[None] - self.pad[:, None]).clamp_min(0)
        return self._forward(tokens, pos, mask, real_BK)

    def _forward(self, tokens_BS, pos_BS, mask_BSK, real_BS) -> torch.Tensor:
        m = self.model
        x = m.embed(tokens_BS)
        rope = None
        if m.pos is not None:
            x = x + m.pos(pos_BS)
        else:
            rope = (self.rope[0][pos_BS][:, None], self.rope[1][pos_BS][:, None])
        aux, stats = [], []
        for block, state in zip(m.blocks, self.states):
            h = block.norm1(x)
            a = attend_cached(block.attn, h, rope, state, mask_BSK, real_BS)
            if block.parallel:
                x = x + a + block._ffn(h, aux, stats)
            else:
                x = x + a
                x = x + block._ffn(block.norm2(x), aux, stats)
        x = m.norm(x[:, -1:])
        return (x @ m.embed.weight.t() if m.head is None else m.head(x))[:, 0]

    def logits(self) -> torch.Tensor:
        with self.context():
            if self.states is None or max(len(s) for s in self.seqs) > self.window:
                self.fed = 0
                return self._prefill()
            # one new token per row, at the row's own position
            tokens = torch.tensor([[s[-1]] for s in self.seqs], device=self.device)
            pos = torch.tensor([[len(s) - 1] for s in self.seqs], device=self.device)
            self.real_BK = torch.cat([self.real_BK, self.real_BK.new_ones(len(self.seqs), 1)], 1)
            mask = self.real_BK[:, None, :]
            return self._forward(tokens, pos, mask, self.real_BK[:, -1:])

    def append(self, ids_B: torch.Tensor) -> None:
        for s, i in zip(self.seqs, ids_B.tolist()):
            s.append(int(i))
