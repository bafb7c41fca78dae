"""Attention blocks of the model zoo: RoPE, multi-head / grouped-query attention, MoH
(Mixture-of-Head) attention and BAM attention experts.

All of them are dense modules: their parameters (MoH heads and routers, BAM attention
branches and router) are replicated and data parallel under every strategy; only the
expert FFNs (hecate.moe.MoELayer) are sharded by dp/ep/fsdp/fssdp.

forward(x_BSD, rope=None) returns y_BSD, or (y_BSD, aux_loss) for blocks that add an
auxiliary loss (MoH with a learned router); the transformer Block collects the latter.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hecate.ops import attention as attention_ops

Rope = Tuple[torch.Tensor, torch.Tensor]  # (cos_SR, sin_SR), R = head_dim // 2


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> Rope:
    """cos/sin of the rotary angles pos * theta^(-2r/head_dim), each [S, head_dim // 2] (fp32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq_R = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SR = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq_R
    return angles_SR.cos(), angles_SR.sin()


def apply_rope(x_BHSd: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the pairs (x[..., r], x[..., r + d/2]) by the position's angle (GPT-NeoX layout)."""
    cos_SR, sin_SR = (t.to(x_BHSd.dtype) for t in rope)
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    return torch.cat((x1 * cos_SR - x2 * sin_SR, x2 * cos_SR + x1 * sin_SR), dim=-1)


_BACKENDS = ("kernel", "sdpa")
_forced_backend: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _kernels_built_for(device_type: str) -> bool:
    return attention_ops.use_extension("flash_attention_fwd", torch.device(device_type)) and \
        attention_ops.use_extension("moh_attention_fwd", torch.device(device_type))


def set_attention_backend(name: Optional[str]) -> None:
    """Force "kernel" (hecate's flash_attention / moh_attention) or "sdpa" (F.scaled_dot_product_attention
    and masking) for every attention block; None restores the default: the kernels on every device
    hecate._C has them for, SDPA elsewhere (decided once per device type)."""
    global _forced_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS} or None, got {name!r}")
    _forced_backend = name


def use_attention_kernels(device: torch.device) -> bool:
    """Whether attention on `device` runs on hecate's kernels (see set_attention_backend)."""
    if _forced_backend == "sdpa":
        return False
    built = _kernels_built_for(device.type)
    if _forced_backend == "kernel" and not built:
        raise RuntimeError(f"attention backend 'kernel' was forced but hecate._C has no attention kernel for "
                           f"{device.type}; run `make build` or set_attention_backend(None)")
    return built


def causal_attention(q_BHSd, k_BGSd, v_BGSd) -> torch.Tensor:
    """Causal softmax attention; G key/value heads each serve H // G query heads (GQA).

    Runs hecate's flash_attention kernel (GQA without repeating K/V) when use_attention_kernels,
    SDPA otherwise, and for value widths that differ from the query/key width (MLA)."""
    d = q_BHSd.shape[-1]
    if v_BGSd.shape[-1] == d and d <= attention_ops.MAX_HEAD_DIM and use_attention_kernels(q_BHSd.device):
        return attention_ops.flash_attention(q_BHSd, k_BGSd, v_BGSd, causal=True)
    rep = q_BHSd.shape[1] // k_BGSd.shape[1]
    if rep > 1:
        k_BGSd = k_BGSd.repeat_interleave(rep, dim=1)
        v_BGSd = v_BGSd.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=True)


def check_heads(d_model: int, n_heads: int, n_kv_heads: Optional[int], head_dim: Optional[int]):
    """Resolve (n_kv_heads, head_dim) and raise ValueError naming the model.* key when invalid."""
    kv = n_heads if n_kv_heads is None else n_kv_heads
    hd = d_model // n_heads if head_dim is None else head_dim
    if head_dim is None and d_model % n_heads:
        raise ValueError(f"model.d_model ({d_model}) must be divisible by model.n_heads ({n_heads}) "
                         "or set model.head_dim")
    if hd < 1:
        raise ValueError(f"model.head_dim must be >= 1, got {hd}")
    if kv < 1 or n_heads % kv:
        raise ValueError(f"model.n_kv_heads ({kv}) must be >= 1 and divide model.n_heads ({n_heads})")
    return kv, hd


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query K/V (n_kv_heads < n_heads) and RoPE.

    One fused projection `qkv` holds [q heads | k heads | v heads]; with n_kv_heads ==
    n_heads it is the classic [3 D, D] layout.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None):
        super().__init__()
        self.n_kv_heads, self.head_dim = check_heads(d_model, n_heads, n_kv_heads, head_dim)
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def project(self, x_BSD, rope: Optional[Rope]):
        """q_BHSd, k_BGSd, v_BGSd (RoPE applied to q and k)."""
        B, S, _ = x_BSD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * d, G * d, G * d], dim=-1)
        q = q.view(B, S, H, d).transpose(1, 2)
        k = k.view(B, S, G, d).transpose(1, 2)
        v = v.view(B, S, G, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def heads(self, x_BSD, rope: Optional[Rope] = None) -> torch.Tensor:
        """Per-head outputs before the output projection, [B, S, H, d]."""
        q, k, v = self.project(x_BSD, rope)
        return causal_attention(q, k, v).transpose(1, 2)

    def forward(self, x_BSD, rope: Optional[Rope] = None):
        B, S, _ = x_BSD.shape
        return self.out(self.heads(x_BSD, rope).reshape(B, S, -1))

    def inactive_parameters(self) -> int:
        """Parameters a token does not use (0: every head runs)."""
        return 0


class HeadRouter(nn.Module):
    """MoH's learned router: W_r over routed heads, W_s over shared heads, W_h 2-way mix."""

    def __init__(self, d_model: int, n_shared: int, n_routed: int):
        super().__init__()
        self.routed = nn.Linear(d_model, n_routed, bias=False)
        self.shared = nn.Linear(d_model, n_shared, bias=False) if n_shared else None
        self.mix = nn.Linear(d_model, 2, bias=False) if n_shared else None


class MoHAttention(Attention):
    """Mixture-of-Head attention (Jin et al., 2024): heads are experts.

    y = sum_i g_i * head_i W_O,i. The first `n_shared` heads are always on; each token
    picks `top_k` of the remaining routed heads. Learned router ("learned"): routed gates
    are softmax(W_r x) over the routed heads, kept on the top-k, renormalized over them;
    shared gates softmax(W_s x); a 2-way softmax(W_h x) weighs the shared group against
    the routed group. Each group's gates are scaled by its number of active heads and the
    mix by 2, so uniform router outputs give every active head gate 1: with all heads
    active the block is exactly multi-head attention. Head balance loss:
    balance_coeff * sum_i P_i f_i over routed heads (P_i mean routed probability, f_i
    fraction of tokens choosing head i).

    The parameter-free router ("query_norm", used to convert a pretrained dense
    attention): score each routed head by the L2 norm of its query, standardize over the
    routed heads, softmax, top-k, binary gates; shared heads gate 1. Its parameters are
    exactly those of Attention, so a dense checkpoint loads unchanged.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, n_shared: int = 0, top_k: Optional[int] = None,
                 router: str = "learned", balance_coeff: float = 0.01):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim)
        n_routed = n_heads - n_shared
        if not 0 <= n_shared < n_heads:
            raise ValueError(f"model.moh_shared_heads ({n_shared}) must be in [0, n_heads={n_heads}) "
                             "so that at least one head is routed")
        k = n_routed if top_k is None else top_k
        if not 1 <= k <= n_routed:
            raise ValueError(f"model.moh_top_k ({top_k}) must be in [1, routed heads={n_routed}] "
                             f"(n_heads {n_heads} - moh_shared_heads {n_shared})")
        if router not in ("learned", "query_norm"):
            raise ValueError(f"model.moh_router={router!r} must be 'learned' or 'query_norm'")
        self.n_shared, self.n_routed, self.top_k = n_shared, n_routed, k
        self.router_kind, self.balance_coeff = router, balance_coeff
        self.router = HeadRouter(d_model, n_shared, n_routed) if router == "learned" else None

    def gates(self, x_TD: torch.Tensor, qnorm_TR: Optional[torch.Tensor]):
        """Head gates [T, H] (fp32) and the weighted head-balance loss (or None)."""
        g_TH, aux, _ = self.route(x_TD, qnorm_TR)
        return g_TH, aux

    def route(self, x_TD: torch.Tensor, qnorm_TR: Optional[torch.Tensor]):
        """(gates [T, H] fp32, balance loss or None, routed head choices [T, top_k] among the routed heads)."""
        T, k = x_TD.shape[0], self.top_k
        if self.router is None:  # parameter-free: query norms, standardized per token
            z = (qnorm_TR - qnorm_TR.mean(-1, keepdim=True)) / (qnorm_TR.std(-1, keepdim=True, unbiased=False) + 1e-6)
            idx_TK = torch.topk(torch.softmax(z, -1), k, dim=-1).indices
            routed_TR = torch.zeros_like(qnorm_TR).scatter_(1, idx_TK, 1.0)
            return torch.cat([routed_TR.new_ones(T, self.n_shared), routed_TR], dim=1), None, idx_TK
        x32 = x_TD.float()
        p_TR = torch.softmax(F.linear(x32, self.router.routed.weight.float()), -1)
        idx_TK = torch.sort(p_TR, dim=-1, descending=True, stable=True).indices[:, :k]
        mask_TR = torch.zeros_like(p_TR).scatter_(1, idx_TK, 1.0)
        kept_TR = p_TR * mask_TR
        routed_TR = kept_TR / kept_TR.sum(-1, keepdim=True).clamp_min(1e-20) * k
        if self.n_shared:
            shared_TS = torch.softmax(F.linear(x32, self.router.shared.weight.float()), -1) * self.n_shared
            mix_T2 = torch.softmax(F.linear(x32, self.router.mix.weight.float()), -1) * 2
            g_TH = torch.cat([shared_TS * mix_T2[:, :1], routed_TR * mix_T2[:, 1:]], dim=1)
        else:
            g_TH = routed_TR
        aux = None
        if self.balance_coeff:
            f_R = mask_TR.mean(0).detach()
            aux = self.balance_coeff * (p_TR.mean(0) * f_R).sum()
        return g_TH, aux, idx_TK

    def route_heads(self, x_BSD: torch.Tensor, q_BHSd: torch.Tensor):
        """route() over the B*S tokens of x, scored by the routed heads' query norms under the
        parameter-free router (shared with the KV-cache decoder)."""
        B, S, D = x_BSD.shape
        qnorm_TR = None
        if self.router is None:
            qnorm_TR = q_BHSd.detach()[:, self.n_shared:].float().norm(dim=-1).permute(0, 2, 1).reshape(B * S, -1)
        return self.route(x_BSD.reshape(-1, D), qnorm_TR)

    def forward(self, x_BSD, rope: Optional[Rope] = None):
        B, S, D = x_BSD.shape
        q, k, v = self.project(x_BSD, rope)
        g_TH, aux, idx_TK = self.route_heads(x_BSD, q)
        if self.head_dim <= attention_ops.MAX_HEAD_DIM and use_attention_kernels(x_BSD.device):
            # Only the selected (token, head) pairs are computed; the kernel applies the gates.
            T = B * S
            shared_TS = torch.arange(self.n_shared, device=idx_TK.device).expand(T, self.n_shared)
            heads_TA = torch.cat([shared_TS, idx_TK + self.n_shared], dim=1)
            o_BHSd = attention_ops.moh_attention(q, k, v, heads_TA.view(B, S, -1),
                                                 g_TH.gather(1, heads_TA).view(B, S, -1), causal=True)
            o_BSHd = o_BHSd.transpose(1, 2)
        else:
            o_BSHd = causal_attention(q, k, v).transpose(1, 2)
            o_BSHd = o_BSHd * g_TH.view(B, S, -1, 1).to(o_BSHd.dtype)
        y = self.out(o_BSHd.reshape(B, S, -1))
        return (y, aux) if aux is not None else y

    def active_head_share(self) -> float:
        """Share of heads a token runs: (shared + top_k routed) / n_heads."""
        return (self.n_shared + self.top_k) / self.n_heads

    def inactive_parameters(self) -> int:
        """Query rows and output columns of the routed heads a token skips (K/V always run)."""
        d_model = self.out.weight.shape[0]
        return 2 * (self.n_routed - self.top_k) * self.head_dim * d_model


class QueryOut(nn.Module):
    """A BAM attention branch whose K/V projection is shared: its own `q` and `out`."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)


class BAMAttention(nn.Module):
    """BAM attention experts (Zhang et al., 2024): N attention branches with soft routing.

    Every branch runs; y = sum_n softmax(W x)_n * attn_n(x). shared_kv=False: each branch
    is a full Attention (`branches.n.qkv`, `branches.n.out`); shared_kv=True: one `kv`
    projection serves all branches, each keeping its own `q` and `out`. Soft routing has
    no balance loss and every parameter is active.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, num_experts: int = 1, shared_kv: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"model.bam_attention_experts must be >= 1, got {num_experts}")
        self.n_kv_heads, self.head_dim = check_heads(d_model, n_heads, n_kv_heads, head_dim)
        self.n_heads, self.num_experts, self.shared_kv = n_heads, num_experts, shared_kv
        self.router = nn.Linear(d_model, num_experts, bias=False)
        if shared_kv:
            self.kv = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=False)
            self.branches = nn.ModuleList(QueryOut(d_model, n_heads, self.head_dim) for _ in range(num_experts))
        else:
            self.kv = None
            self.branches = nn.ModuleList(Attention(d_model, n_heads, self.n_kv_heads, self.head_dim)
                                          for _ in range(num_experts))

    def shared_project(self, x_BSD, rope: Optional[Rope]):
        """shared_kv=True: ([q_BHSd of each branch], k_BGSd, v_BGSd), RoPE applied to q and k
        (shared with the KV-cache decoder; shared_kv=False branches are Attention.project)."""
        B, S, _ = x_BSD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        k, v = self.kv(x_BSD).view(B, S, 2, G, d).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, rope)
        qs = []
        for branch in self.branches:
            q = branch.q(x_BSD).view(B, S, H, d).transpose(1, 2)
            qs.append(apply_rope(q, rope) if rope is not None else q)
        return qs, k, v

    def forward(self, x_BSD, rope: Optional[Rope] = None):
        B, S, D = x_BSD.shape
        with torch.autocast(device_type=x_BSD.device.type, enabled=False):
            w_BSN = torch.softmax(F.linear(x_BSD.float(), self.router.weight.float()), -1)
        w_BSN = w_BSN.to(x_BSD.dtype)
        if not self.shared_kv:
            ys = [branch(x_BSD, rope) for branch in self.branches]
        else:
            qs, k, v = self.shared_project(x_BSD, rope)
            ys = [branch.out(causal_attention(q, k, v).transpose(1, 2).reshape(B, S, -1))
                  for branch, q in zip(self.branches, qs)]
        y = ys[0] * w_BSN[..., 0:1]
        for n in range(1, self.num_experts):
            y = y + ys[n] * w_BSN[..., n:n + 1]
        return y

    def inactive_parameters(self) -> int:
        return 0



def lightning_decays(n_heads: int) -> torch.Tensor:
    """Per-head decay exp(-2^(-8 (h + 1) / H)): ALiBi-like slopes, from fast (head 0) to slow."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads)
    return torch.exp(-slopes)


class LightningAttention(nn.Module):
    """Lightning Attention (TransNormerLLM / Lightning Attention-2): causal linear attention
    o_t = sum_{s <= t} decay_h^(t - s) (q_t . k_s) v_s with SiLU feature maps on q and k, a fixed
    per-head decay (lightning_decays), an RMS norm of each head's output, then the output
    projection. Computed block by block (hecate.ops.attention.lightning_attention, intra-block
    masked products + an inter-block key-value state): time and memory grow linearly with S.
    GQA K/V heads are repeated to the query heads. No softmax, so no flash kernel is involved.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, block_size: int = 64, eps: float = 1e-6):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"model.lightning_block_size must be >= 1, got {block_size}")
        self.n_kv_heads, self.head_dim = check_heads(d_model, n_heads, n_kv_heads, head_dim)
        self.n_heads, self.block_size, self.eps = n_heads, block_size, eps
        self.qkv = nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.register_buffer("decay", lightning_decays(n_heads), persistent=False)

    def project(self, x_BSD, rope: Optional[Rope]):
        """q_BHSd, k_BHSd, v_BHSd: SiLU feature maps on q and k, RoPE on both, GQA K/V heads
        repeated to the query heads (shared with the KV-cache decoder)."""
        B, S, _ = x_BSD.shape
        H, G, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * d, G * d, G * d], dim=-1)
        q = F.silu(q).view(B, S, H, d).transpose(1, 2)
        k = F.silu(k).view(B, S, G, d).transpose(1, 2)
        v = v.view(B, S, G, d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if G != H:
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        return q, k, v

    def forward(self, x_BSD, rope: Optional[Rope] = None):
        B, S, _ = x_BSD.shape
        q, k, v = self.project(x_BSD, rope)
        o = attention_ops.lightning_attention(q, k, v, self.decay, self.block_size)
        o = o.float()
        o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)).to(x_BSD.dtype)
        return self.out(o.transpose(1, 2).reshape(B, S, -1))

    def inactive_parameters(self) -> int:
        return 0
