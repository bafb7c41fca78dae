"""Python face of the attention kernels: flash_attention and moh_attention (docs/ops.md).

Layouts: q_BHSd [B, H, Sq, d], k_BGSd / v_BGSd [B, G, Sk, d] with G dividing H (GQA / MQA:
query head h reads kv head h // (H // G)); outputs are [B, H, Sq, d]. The CPU kernel accepts
any strides whose last dimension is contiguous (a [B, S, H, d] projection transposed to
[B, H, S, d] is read in place) and returns views of [B, Sq, H, d] buffers, the layout the output
projection of a model reads; the CUDA wrapper copies q, k, v to contiguous [B, H, S, d] and
returns contiguous [B, H, Sq, d] tensors.

Each call validates its input (ValueError / TypeError naming the argument), then runs the
compiled kernel for the tensors' device when hecate._C has one, else the materialised
reference (`hecate.ops.reference`, memory O(S^2): fine for tests, not for long sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hecate.ops import _validate as check
from hecate.ops import reference
from hecate.ops._backend import op, reference_runs, use_extension

__all__ = ["BlockSparse", "flash_attention", "moh_attention", "lightning_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class BlockSparse:
    """A per-head block-sparse pattern as a compact list (CSR over query blocks).

    For head h and query block qb (rows qb*block_size ...), the visible key blocks are
    cols[offsets[h, qb]:offsets[h, qb + 1]], strictly ascending. Static MoA masks and the
    strided shards of S2-Attention are both such lists. Sink keys (j < sinks) are visible even
    where a block is not listed; causality and the window still apply inside listed blocks.
    """

    offsets_HQ: torch.Tensor  # int64 [H, ceil(Sq / block_size) + 1]
    cols: torch.Tensor        # int64 [nnz]
    block_size: int

    @staticmethod
    def from_mask(mask_HQK: torch.Tensor, block_size: int) -> "BlockSparse":
        """The list of a dense bool block mask [H, query blocks, key blocks]."""
        check.tensor("mask_HQK", mask_HQK, 3, boolean=True)
        check.integer("block_size", block_size, minimum=1)
        H, nqb, _ = mask_HQK.shape
        counts = mask_HQK.sum(-1).reshape(-1)
        offsets = torch.zeros(H * nqb + 1, dtype=torch.int64, device=mask_HQK.device)
        offsets[1:] = counts.cumsum(0)
        # nonzero() is row-major, so columns come out ascending within each (head, query block)
        cols = mask_HQK.reshape(H * nqb, -1).nonzero()[:, 1].to(torch.int64)
        # offsets are global into cols: head h, block qb -> entry h * nqb + qb of the flat scan
        rows = torch.arange(H, device=mask_HQK.device)[:, None] * nqb + torch.arange(nqb + 1, device=mask_HQK.device)
        offsets_HQ = offsets[rows]
        return BlockSparse(offsets_HQ, cols, block_size)


def _check_qkv(q, k, v):
    for name, t in (("q_BHSd", q), ("k_BGSd", k), ("v_BGSd", v)):
        check.tensor(name, t, 4, floating=True)
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; attention takes float32, bfloat16, float16 "
                             "or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check.same_device(q_BHSd=q, k_BGSd=k, v_BGSd=v)
    B, H, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k_BGSd {tuple(k.shape)} and v_BGSd {tuple(v.shape)} must have one shape")
    if k.shape[0] != B:
        raise ValueError(f"k_BGSd has batch {k.shape[0]} but q_BHSd has {B}")
    if k.shape[3] != d:
        raise ValueError(f"k_BGSd has head_dim {k.shape[3]} but q_BHSd has {d}")
    G = k.shape[1]
    if H < 1:  # the CPU kernel divides by H // G (a SIGFPE), the CUDA launcher refuses it
        raise ValueError(f"q_BHSd {tuple(q.shape)} has no query heads; attention needs at least one")
    if G < 1 or H % G:
        raise ValueError(f"the kv heads of k_BGSd ({G}) must divide the query heads of q_BHSd ({H}) "
                         "(GQA: each kv head serves H // G query heads)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} is outside [1, {MAX_HEAD_DIM}]")


def _check_mask_args(causal, scale, window, sinks):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check.integer("window", window, minimum=0)
    check.integer("sinks", sinks, minimum=0)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (1/sqrt(head_dim)), got {scale!r}")


def _check_block_sparse(bs: BlockSparse, q, k):
    if not isinstance(bs, BlockSparse):
        raise TypeError(f"block_sparse must be a hecate.ops.attention.BlockSparse, got {type(bs).__name__}")
    check.integer("block_sparse.block_size", bs.block_size, minimum=1)
    H, Sq, Sk = q.shape[1], q.shape[2], k.shape[2]
    nqb, nkb = -(-Sq // bs.block_size), -(-Sk // bs.block_size)
    check.tensor("block_sparse.offsets_HQ", bs.offsets_HQ, 2, integer=True)
    check.shape("block_sparse.offsets_HQ", bs.offsets_HQ, (H, nqb + 1), "[H, ceil(Sq / block_size) + 1]")
    check.tensor("block_sparse.cols", bs.cols, 1, integer=True)
    check.same_device(**{"block_sparse.offsets_HQ": bs.offsets_HQ, "block_sparse.cols": bs.cols})
    check.below("block_sparse.cols", bs.cols, nkb, "the key blocks ceil(Sk / block_size)", allow_negative=False)
    _check_block_list(bs.offsets_HQ, bs.cols)


def _check_block_list(offsets_HQ: torch.Tensor, cols: torch.Tensor) -> None:
    """Every (head, query block) segment cols[offsets[h, qb]:offsets[h, qb + 1]] lies in
    [0, nnz] and is strictly ascending, as the CPU kernel checks. The CUDA kernel
    binary-searches these segments unchecked: a bad offset reads past `cols` (an illegal
    memory access), an unsorted segment hides listed blocks. Checked where the list lives:
    on the host at once (ValueError), on an accelerator queued (torch._assert_async)."""
    nnz = cols.numel()
    lo, hi = offsets_HQ[:, :-1], offsets_HQ[:, 1:]
    bad_range_HQ = (lo < 0) | (lo > hi) | (hi > nnz)
    # Pairs (i - 1, i) inside one segment [a, e) (a < i < e) must ascend: mark them with a
    # difference array over the non-empty segments (+1 at a + 1, -1 at e), summed up.
    inside = torch.zeros(nnz + 2, dtype=torch.int64, device=cols.device)
    if nnz > 1:
        weight = ((hi > lo) & ~bad_range_HQ).reshape(-1).to(torch.int64)
        inside.scatter_add_(0, (lo + 1).clamp(0, nnz + 1).reshape(-1), weight)
        inside.scatter_add_(0, hi.clamp(0, nnz + 1).reshape(-1), -weight)
    inside = inside.cumsum(0)[1:nnz] > 0  # pair (i - 1, i) for i = 1 .. nnz - 1
    unsorted = inside & (cols[1:] <= cols[:-1])
    what = ("block_sparse.offsets_HQ must be non-decreasing within [0, len(cols) = {nnz}] per head "
            "and each segment of block_sparse.cols strictly ascending (BlockSparse.from_mask builds "
            "such a list)").format(nnz=nnz)
    if not check.host_reads_free(cols.device) and not check.sync_checks():
        torch._assert_async(~(bad_range_HQ.any() | unsorted.any()), what)
        return
    if bool(bad_range_HQ.any()):
        h, qb = (int(v) for v in bad_range_HQ.nonzero()[0])
        raise ValueError(f"{what}; head {h} query block {qb} has offsets {int(lo[h, qb])}..{int(hi[h, qb])}")
    if bool(unsorted.any()):
        i = int(unsorted.nonzero()[0, 0]) + 1
        raise ValueError(f"{what}; cols[{i - 1}] = {int(cols[i - 1])} and cols[{i}] = {int(cols[i])} "
                         "share a segment but do not ascend")


def flash_attention(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, *,
                    causal: bool = True, scale: Optional[float] = None, window: int = 0, sinks: int = 0,
                    block_sparse: Optional[BlockSparse] = None) -> torch.Tensor:
    """Softmax attention without the [S, S] score matrix; returns [B, H, Sq, d] in q's dtype.

    causal: query row s (position s + Sk - Sq) sees keys j <= its position. window > 0: only the
    last `window` keys (causal) or keys within `window - 1` of the position (non-causal). sinks:
    the first `sinks` keys stay visible past the window and the block list (StreamingLLM).
    block_sparse: a per-head block list (BlockSparse). A query that sees no key gets 0.
    Differentiable in q, k and v; math in fp32 (fp64 for fp64 input).
    """
    _check_qkv(q_BHSd, k_BGSd, v_BGSd)
    _check_mask_args(causal, scale, window, sinks)
    offsets = cols = None
    block_size = 0
    if block_sparse is not None:
        _check_block_sparse(block_sparse, q_BHSd, k_BGSd)
        from hecate.ops import to_device  # a host list goes up pinned, without blocking the host

        offsets, cols, block_size = (to_device(block_sparse.offsets_HQ, q_BHSd.device),
                                     to_device(block_sparse.cols, q_BHSd.device), block_sparse.block_size)
    scale_value = float(scale) if scale is not None else 0.0
    if not use_extension("flash_attention_fwd", q_BHSd.device):
        reference_runs("flash_attention_fwd", q_BHSd.device)
        return reference.flash_attention(q_BHSd, k_BGSd, v_BGSd, scale=scale, causal=causal, window=window,
                                         sinks=sinks, block_offsets=offsets, block_cols=cols,
                                         block_size=block_size)
    return FlashAttention.apply(q_BHSd, k_BGSd, v_BGSd, scale_value, causal, window, sinks, offsets,
                                cols, block_size)


def moh_attention(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                  head_idx_BSK: torch.Tensor, head_weight_BSK: torch.Tensor, *, causal: bool = True,
                  scale: Optional[float] = None, window: int = 0, sinks: int = 0) -> torch.Tensor:
    """Head-routed attention (MoH): only the (token, head) pairs the router selected are computed.

    head_idx_BSK (int64, -1 = unused slot; no head twice per token) and head_weight_BSK give each
    token's heads and their weights. out[b, h, s] = weight * attention of head h at token s when
    the token selected h, else 0; [B, H, S, d]. Differentiable in q, k, v and the weights.
    """
    _check_qkv(q_BHSd, k_BGSd, v_BGSd)
    _check_mask_args(causal, scale, window, sinks)
    B, H, S, _ = q_BHSd.shape
    if k_BGSd.shape[2] != S:
        raise ValueError(f"moh_attention needs q and k of one length, got {S} and {k_BGSd.shape[2]}")
    check.tensor("head_idx_BSK", head_idx_BSK, 3, integer=True)
    if tuple(head_idx_BSK.shape[:2]) != (B, S):
        raise ValueError(f"head_idx_BSK must have shape ({B}, {S}, K) (batch, tokens of q_BHSd), got "
                         f"{tuple(head_idx_BSK.shape)}")
    check.tensor("head_weight_BSK", head_weight_BSK, 3, floating=True)
    check.shape("head_weight_BSK", head_weight_BSK, head_idx_BSK.shape, "same as head_idx_BSK")
    check.same_device(q_BHSd=q_BHSd, head_idx_BSK=head_idx_BSK, head_weight_BSK=head_weight_BSK)
    check.below("head_idx_BSK", head_idx_BSK, H, "the query heads", allow_negative=True)
    _check_head_idx(head_idx_BSK)
    scale_value = float(scale) if scale is not None else 0.0
    if not use_extension("moh_attention_fwd", q_BHSd.device):
        reference_runs("moh_attention_fwd", q_BHSd.device)
        return reference.moh_attention(q_BHSd, k_BGSd, v_BGSd, head_idx_BSK, head_weight_BSK, scale=scale,
                                       causal=causal, window=window, sinks=sinks)
    return MoHAttentionFn.apply(q_BHSd, k_BGSd, v_BGSd, head_idx_BSK, head_weight_BSK, scale_value,
                                causal, window, sinks)


def _check_head_idx(head_idx_BSK: torch.Tensor) -> None:
    """Entries >= -1 and no head twice per token: on the host at once (ValueError), on an
    accelerator queued on the device (torch._assert_async; the CUDA kernel does not check,
    and a repeated head would silently keep one of its weights)."""
    if not head_idx_BSK.numel():
        return
    below = (head_idx_BSK < -1).any()
    sorted_idx = head_idx_BSK.sort(-1).values
    twice = ((sorted_idx[..., 1:] == sorted_idx[..., :-1]) & (sorted_idx[..., 1:] >= 0)).any()
    if not check.host_reads_free(head_idx_BSK.device) and not check.sync_checks():
        torch._assert_async(~(below | twice), "head_idx_BSK entries must be >= -1 (-1 marks an unused "
                            "slot) and select each head at most once per token")
        return
    if bool(below):
        raise ValueError("head_idx_BSK entries must be >= -1 (-1 marks an unused slot)")
    if bool(twice):
        raise ValueError("head_idx_BSK selects one head twice for a token; each head at most once")


class FlashAttention(torch.autograd.Function):
    """Saves q, k, v, out and the fp32 logsumexp; backward recomputes the score tiles."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, sinks, offsets, cols, block_size):
        out, lse = op("flash_attention_fwd")(q, k, v, scale, causal, window, sinks, offsets, cols, block_size)
        ctx.save_for_backward(q, k, v, out, lse, offsets, cols)
        ctx.args = (scale, causal, window, sinks, block_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, offsets, cols = ctx.saved_tensors
        scale, causal, window, sinks, block_size = ctx.args
        dq, dk, dv = op("flash_attention_bwd")(grad_out, q, k, v, out, lse, scale, causal, window, sinks,
                                               offsets, cols, block_size)
        return dq, dk, dv, None, None, None, None, None, None, None


class MoHAttentionFn(torch.autograd.Function):
    """Saves the unweighted head outputs and logsumexp of the selected pairs."""

    @staticmethod
    def forward(ctx, q, k, v, head_idx, head_weight, scale, causal, window, sinks):
        out, out_raw, lse = op("moh_attention_fwd")(q, k, v, head_idx, head_weight, scale, causal, window, sinks)
        ctx.save_for_backward(q, k, v, head_idx, head_weight, out_raw, lse)
        ctx.args = (scale, causal, window, sinks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, head_idx, head_weight, out_raw, lse = ctx.saved_tensors
        dq, dk, dv, dw = op("moh_attention_bwd")(grad_out, q, k, v, head_idx, head_weight, out_raw, lse,
                                                 *ctx.args)
        return dq, dk, dv, None, dw, None, None, None, None


def lightning_attention(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor,
                        decay_H: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Lightning Attention (causal linear attention with decay), tiled: o_t = sum_{s <= t}
    decay_h^(t - s) (q_t . k_s) v_s, O(S * block_size) time and memory per head.

    Intra-block: the masked, decayed [block, block] products (q k^T * decay^(i - j)) v. Inter-block:
    q_i decay^(i + 1) times a running [d, d_v] key-value state, then state = decay^block * state +
    sum_j decay^(block - 1 - j) k_j v_j^T. Plain PyTorch (a few GEMMs per block, differentiable by
    autograd): nothing here is a fused kernel. decay_H in (0, 1], one per head; math in fp32.
    """
    for name, t in (("q_BHSd", q_BHSd), ("k_BHSd", k_BHSd), ("v_BHSd", v_BHSd)):
        check.tensor(name, t, 4, floating=True)
    if k_BHSd.shape != q_BHSd.shape or v_BHSd.shape[:3] != q_BHSd.shape[:3]:
        raise ValueError(f"lightning_attention needs k_BHSd of q's shape {tuple(q_BHSd.shape)} and v_BHSd of its "
                         f"[B, H, S], got {tuple(k_BHSd.shape)} and {tuple(v_BHSd.shape)}")
    check.tensor("decay_H", decay_H, 1, floating=True)
    check.shape("decay_H", decay_H, (q_BHSd.shape[1],), "one decay per head")
    check.integer("block_size", block_size, minimum=1)
    B, H, S, d = q_BHSd.shape
    math = torch.float64 if q_BHSd.dtype == torch.float64 else torch.float32
    q, k, v = q_BHSd.to(math), k_BHSd.to(math), v_BHSd.to(math)
    log_decay_H11 = decay_H.to(math).log().view(H, 1, 1)
    kv_BHdv = q.new_zeros(B, H, d, v.shape[-1])
    outs = []
    for start in range(0, S, block_size):
        n = min(block_size, S - start)
        qb, kb, vb = (t[:, :, start:start + n] for t in (q, k, v))
        i = torch.arange(n, device=q.device, dtype=math)
        dist = i[:, None] - i[None, :]
        mask_Hnn = torch.where(dist >= 0, torch.exp(log_decay_H11 * dist.clamp_min(0)), torch.zeros((), dtype=math,
                                                                                                    device=q.device))
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * mask_Hnn, vb)
        inter = torch.matmul(qb * torch.exp(log_decay_H11 * (i + 1)[:, None]), kv_BHdv)
        outs.append(intra + inter)
        k_decayed = kb * torch.exp(log_decay_H11 * (n - 1 - i)[:, None])
        kv_BHdv = torch.exp(log_decay_H11 * n) * kv_BHdv + torch.matmul(k_decayed.transpose(-1, -2), vb)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return out.to(q_BHSd.dtype)
