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

A decode step's fixed cost (one token per row, one CPU thread) is what limits its speed, so
the step avoids work whose result is known: keys/values are written in place into buffers
reserved for the whole generation (no copy of the cache per step), grouped-query heads attend
their shared K/V without repeating it, rows without left padding attend without a mask,
positions advance on the device, and on the CPU an MoE layer with the local strategy runs
each chosen expert on its rows (moe_decode) instead of the permute / grouped-GEMM dispatch
built for thousands of tokens. Each of these computes what the general path computes
(tests/test_inference_kv_cache.py compares them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hecate.models.attention import (Attention, BAMAttention, LightningAttention, MoHAttention, apply_rope,
                                     rope_tables)
from hecate.models.attention_options import MLAttention
from hecate.models.rope_scaling import scaled_rope_tables
from hecate.models.transformer import MoETransformer
from hecate.moe.experts import GroupedExperts, _activate as activate_rows, autocast_dtype
from hecate.moe.layer import MoELayer
from hecate.moe.overrides import stacked_overrides
from hecate.moe.strategy import LocalStrategy


def _attend(q_BHSd, k_BGKd, v_BGKd, mask_BSK, scale=None) -> torch.Tensor:
    """Softmax attention of the new queries over the cached keys; mask_BSK True = may attend
    (None: every key). The H // G query heads of a K/V head attend it as one block of rows:
    query head h uses K/V head h // (H // G), as repeat_interleave would, without the copy."""
    B, H, S, _ = q_BHSd.shape
    G = k_BGKd.shape[1]
    if H == G:
        mask = None if mask_BSK is None else mask_BSK[:, None]
        return F.scaled_dot_product_attention(q_BHSd, k_BGKd, v_BGKd, attn_mask=mask, scale=scale)
    rep = H // G
    q = q_BHSd.reshape(B, G, rep * S, q_BHSd.shape[-1])  # rows (head in group, query)
    mask = None
    if mask_BSK is not None:
        K = mask_BSK.shape[-1]
        mask = mask_BSK[:, None].expand(B, rep, S, K).reshape(B, 1, rep * S, K)
    o = F.scaled_dot_product_attention(q, k_BGKd, v_BGKd, attn_mask=mask, scale=scale)
    return o.view(B, H, S, v_BGKd.shape[-1])


class KVState:
    """Keys/values of one attention block, keyed by name (BAM: one per branch), each in a
    buffer [B, G, capacity, d] filled up to its length; or Lightning's key-value state."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # slots reserved at the first extend (grown by doubling past it)
        self.kv: dict = {}  # name -> (k buffer, v buffer, length)
        self.linear_state: Optional[torch.Tensor] = None  # Lightning attention's [B, H, d, d]

    def extend(self, name: str, k, v):
        """Append k, v [B, G, S, d] (in place) and return the name's keys and values so far."""
        S = k.shape[2]
        if name in self.kv:
            kb, vb, n = self.kv[name]
        else:
            kb, vb, n = None, None, 0
        if kb is None or n + S > kb.shape[2]:
            cap = max(self.capacity, n + S, 2 * n)
            nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if n:
                nk.narrow(2, 0, n).copy_(kb.narrow(2, 0, n))
                nv.narrow(2, 0, n).copy_(vb.narrow(2, 0, n))
            kb, vb = nk, nv
        kb.narrow(2, n, S).copy_(k)
        vb.narrow(2, n, S).copy_(v)
        self.kv[name] = (kb, vb, n + S)
        return kb.narrow(2, 0, n + S), vb.narrow(2, 0, n + S)

    def cached(self) -> list:
        """(k, v) of every name, as filled so far."""
        return [(kb.narrow(2, 0, n), vb.narrow(2, 0, n)) for kb, vb, n in self.kv.values()]


def _mha(attn: Attention, h, rope, state: KVState, mask, name="") -> torch.Tensor:
    if type(attn) is Attention and rope is not None:
        q, k, v = _project_rope_once(attn, h, rope)
    else:
        q, k, v = attn.project(h, rope)
    k, v = state.extend(name, k, v)
    return _attend(q, k, v, mask).transpose(1, 2)  # [B, S, H, d]


def _project_rope_once(attn: Attention, h, rope):
    """Attention.project with RoPE applied to the query and key heads in one call (the same
    elementwise rotation per head, half the operations of rotating q and k apart)."""
    B, S, _ = h.shape
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = attn.qkv(h).view(B, S, H + 2 * G, d).transpose(1, 2)
    qk = apply_rope(qkv[:, :H + G], rope)
    return qk[:, :H], qk[:, H:], qkv[:, H + G:]


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
    if real_BS is not None:
        k = k * real_BS[:, None, :, None].to(k.dtype)
    s_BHdd = state.linear_state
    if s_BHdd is None:
        s_BHdd = q.new_zeros(B, H, d, d, dtype=torch.float32)
    decay = attn.decay.float()[None, :, None, None]
    outs = []
    for t in range(S):
        s_BHdd = decay * s_BHdd + k[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t].float(), s_BHdd))
    state.linear_state = s_BHdd
    o = torch.stack(outs, 2)
    o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + attn.eps)).to(h.dtype)
    return attn.out(o.transpose(1, 2).reshape(B, S, -1))


def attend_cached(attn, h, rope, state: KVState, mask_BSK, real_BS) -> torch.Tensor:
    """One attention block on the new rows h [B, S, D], extending `state`. mask_BSK / real_BS
    None: every cached key may be attended / every new row is a real token."""
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


def moe_decode_applies(layer: MoELayer, x: torch.Tensor) -> bool:
    """Whether moe_decode runs `layer` on x: the local strategy, experts that run one expert
    alone (expert_forward), eval mode, a CPU tensor (it reads the chosen experts on the host)
    and no autocast (grouped_mlp casts for autocast itself)."""
    return (type(layer.strategy) is LocalStrategy and hasattr(layer.experts, "expert_forward")
            and not layer.training and x.device.type == "cpu" and autocast_dtype("cpu") is None)


def moe_decode(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """layer(x).y for a decode step's few rows: the layer's own checks, routing (overrides,
    capacity) and dense parts; each expert a row chose then runs on that row alone and the
    outputs are summed with the routing weights in fp32, in slot order, as the local
    strategy's unpermute sums them. Use when moe_decode_applies(layer, x)."""
    x_TD, routing = layer.prepare(x)
    T, K = routing.indices_TK.shape
    one_row = T == 1
    groups: dict = {}  # expert -> (tokens, slots), in slot order for one row
    for t, row in enumerate(routing.indices_TK.tolist()):
        for k, e in enumerate(row):
            if e >= 0:  # -1: dropped by capacity / an expert-choice slot left empty
                ts, ks = groups.setdefault(e, ([], []))
                ts.append(t)
                ks.append(k)
    one_row = one_row and len(groups) == K  # every slot of the one row used: no gather, no scatter
    xs = [x_TD if one_row else x_TD[ts] for ts, _ in groups.values()]
    ys = _expert_rows(layer.experts, list(groups), xs)
    math = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    w_TK = routing.weights_TK.to(math)
    if one_row:
        out_TD = (torch.cat(ys).to(math) * w_TK.view(K, 1)).sum(0, keepdim=True)
    else:
        y_TKD = x_TD.new_zeros(T, K, x_TD.shape[1], dtype=math)
        for (ts, ks), y in zip(groups.values(), ys):
            y_TKD[ts, ks] = y.to(math)
        out_TD = (y_TKD * w_TK.unsqueeze(-1)).sum(1)
    return layer.combine_dense(x_TD, out_TD.to(x_TD.dtype)).reshape(x.shape)


def _expert_rows(experts, expert_ids: list, xs: list) -> list:
    """Expert expert_ids[i] on the rows xs[i]; GroupedExperts run one activation over all rows
    (as grouped_mlp does), other experts their expert_forward."""
    if not isinstance(experts, GroupedExperts):
        return [experts.expert_forward(e, x) for e, x in zip(expert_ids, xs)]
    w1, w2, w3 = experts.w1_EFD, experts.w2_EDF, experts.w3_EFD
    h1 = torch.cat([F.linear(x, w1[e]) for e, x in zip(expert_ids, xs)])
    h3 = None if w3 is None else torch.cat([F.linear(x, w3[e]) for e, x in zip(expert_ids, xs)])
    a = activate_rows(h1, h3, experts.activation)
    ys, start = [], 0
    for e, x in zip(expert_ids, xs):
        ys.append(F.linear(a[start:start + x.shape[0]], w2[e]))
        start += x.shape[0]
    return ys


def _ffn_cached(block, h) -> torch.Tensor:
    if isinstance(block.ffn, MoELayer) and h.shape[1] == 1 and moe_decode_applies(block.ffn, h):
        return moe_decode(block.ffn, h)
    return block._ffn(h, [], [])


class CachedDecoder:
    """KV-cached decoder with the interface of hecate.inference.sampling.FullDecoder.

    reserve: new tokens expected per row (generate passes max_new_tokens): the K/V buffers are
    sized for prompt + reserve slots (at most max_seq_len) at once; more still works (the
    buffers double)."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], overrides: Sequence[dict] = (),
                 reserve: int = 0):
        if not isinstance(model, MoETransformer):
            raise ValueError(f"the KV cache decodes MoETransformer models, not {type(model).__name__}; "
                             "generate with use_cache=False (--no-cache)")
        self.model, self.overrides = model, list(overrides)
        self.seqs = [list(p) for p in prompts]
        self.device = next(model.parameters()).device
        self.window = model.cfg.max_seq_len
        self.reserve = max(int(reserve), 0)
        self.states: Optional[list] = None
        self.max_len = max(len(s) for s in self.seqs)
        self.last_B1: Optional[torch.Tensor] = None  # the newest token of each row, [B, 1]
        cfg = model.cfg
        self.rope = None
        if model.pos is None:
            hd = model.blocks[0].attn.head_dim
            self.rope = (rope_tables(self.window, hd, cfg.rope_theta, device=self.device)
                         if cfg.rope_scaling is None else
                         scaled_rope_tables(self.window, hd, cfg.rope_theta, cfg.rope_scaling, device=self.device))

    def context(self):
        return stacked_overrides(self.model, self.overrides)

    def _prefill(self):
        ctx = [s[-self.window:] for s in self.seqs]
        P = max(len(c) for c in ctx)
        pad = [P - len(c) for c in ctx]
        self.pad = torch.tensor(pad, device=self.device)
        tokens = torch.tensor([[0] * (P - len(c)) + c for c in ctx], device=self.device)
        slots = torch.arange(P, device=self.device)
        real_BK = slots[None] >= self.pad[:, None]
        # query i may attend key j <= i of its row's real tokens (a pad query: itself, never used)
        mask = (slots[None, :, None] >= slots[None, None, :]) & (real_BK[:, None, :] | torch.eye(
            P, dtype=torch.bool, device=self.device)[None])
        capacity = min(self.window, P + self.reserve)
        self.states = [KVState(capacity) for _ in self.model.blocks]
        # Which cached slots are real tokens, for every slot a step can reach (decoded slots are);
        # None when no row is padded: decode steps then attend without a mask.
        self.real_BK = None
        if any(pad):
            self.real_BK = torch.ones(len(ctx), self.window, dtype=torch.bool, device=self.device)
            self.real_BK[:, :P] = real_BK
        self.fed = P  # slots in the cache
        pos = (slots[None] - self.pad[:, None]).clamp_min(0)
        self.pos_B1 = pos[:, -1:].clone()  # each row's newest position
        return self._forward(tokens, pos, mask, real_BK)

    def _forward(self, tokens_BS, pos_BS, mask_BSK, real_BS) -> torch.Tensor:
        m = self.model
        x = m.embed(tokens_BS)
        rope = None
        if m.pos is not None:
            x = x + m.pos(pos_BS)
        else:
            rope = (self.rope[0][pos_BS][:, None], self.rope[1][pos_BS][:, None])
        for block, state in zip(m.blocks, self.states):
            h = block.norm1(x)
            a = attend_cached(block.attn, h, rope, state, mask_BSK, real_BS)
            if block.parallel:
                x = x + a + _ffn_cached(block, h)
            else:
                x = x + a
                x = x + _ffn_cached(block, block.norm2(x))
        x = m.norm(x[:, -1:])
        return (x @ m.embed.weight.t() if m.head is None else m.head(x))[:, 0]

    def logits(self) -> torch.Tensor:
        with self.context():
            if self.states is None or self.max_len > self.window:
                return self._prefill()
            # one new token per row, at the row's own position
            if self.last_B1 is None:
                self.last_B1 = torch.tensor([[s[-1]] for s in self.seqs], device=self.device)
            self.pos_B1 += 1
            self.fed += 1
            mask = None if self.real_BK is None else self.real_BK[:, None, :self.fed]
            return self._forward(self.last_B1, self.pos_B1, mask, None)

    def append(self, ids_B: torch.Tensor) -> None:
        for s, i in zip(self.seqs, ids_B.tolist()):
            s.append(int(i))
        self.max_len += 1
        self.last_B1 = ids_B.reshape(-1, 1).to(self.device)
