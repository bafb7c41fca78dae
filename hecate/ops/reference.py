"""Plain-PyTorch versions of every hecate._C operator (docs/ops.md).

These are the test oracle: written for clarity, not speed. They perform no
input validation (the public face in hecate.ops does) and are differentiable
through ordinary torch autograd where the op has a backward pass.
"""
from __future__ import annotations

from typing import Optional

import torch

# Renormalization divides by max(sum, _RENORM_EPS) so that an all-zero selection gives 0, not NaN.
_RENORM_EPS = 1e-20


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every float input, fp64 for fp64 (so gradcheck can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_order(*keys_ascending: torch.Tensor) -> torch.Tensor:
    """Indices sorting entries by keys[0], then keys[1], ... (all ascending), ties by position."""
    n = keys_ascending[0].numel()
    order = torch.arange(n, device=keys_ascending[0].device)
    for key in reversed(keys_ascending):  # least significant key first, stable sorts
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def topk_gating(logits_TE: torch.Tensor, k: int, score_func: str = "softmax",
                renormalize: bool = True, bias_E: Optional[torch.Tensor] = None):
    """Scores, top-k expert indices (ties: lower index) and their (renormalized) weights."""
    math = _math_dtype(logits_TE.dtype)
    logits = logits_TE.to(math)
    if score_func == "softmax":
        scores_TE = torch.softmax(logits, dim=-1)
    elif score_func == "sigmoid":
        scores_TE = torch.sigmoid(logits)
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    select_TE = scores_TE.detach()
    if bias_E is not None:
        select_TE = select_TE + bias_E.to(math)
    # A stable descending sort keeps the lower expert index first among equal values.
    indices_TK = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :k]
    weights_TK = scores_TE.gather(1, indices_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(_RENORM_EPS)
    return weights_TK, indices_TK.to(torch.int64), scores_TE


def expert_histogram(indices_TK: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Number of entries per bin; negative entries are ignored."""
    flat = indices_TK.reshape(-1)
    # Negative entries land in an extra bin that is cut off: no boolean mask, no bincount,
    # so a device without the kernel does not read values back either.
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_bins))
    counts = torch.zeros(num_bins + 1, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, key, torch.ones_like(key))[:num_bins]


def _kept_mask(bins_TK: torch.Tensor, num_bins: int, capacity: int,
               priority_TK: Optional[torch.Tensor]) -> torch.Tensor:
    """Which (t, k) entries survive routing (bin >= 0) and the per-bin capacity."""
    T, K = bins_TK.shape
    routed_TK = bins_TK >= 0
    if capacity < 0:
        return routed_TK
    bins = torch.where(routed_TK, bins_TK, num_bins)  # unrouted entries sort last, never kept
    t_TK = torch.arange(T, device=bins.device).unsqueeze(1).expand(T, K)
    k_TK = torch.arange(K, device=bins.device).unsqueeze(0).expand(T, K)
    if priority_TK is None:  # GShard: all 1st choices, then all 2nd choices, ...
        order = _stable_order(bins.reshape(-1), k_TK.reshape(-1), t_TK.reshape(-1))
    else:  # highest priority first, ties: lower token, then lower k
        neg_priority = -priority_TK.to(torch.float64)
        order = _stable_order(bins.reshape(-1), neg_priority.reshape(-1),
                              t_TK.reshape(-1), k_TK.reshape(-1))
    sorted_bins = bins.reshape(-1)[order]
    counts = torch.bincount(sorted_bins, minlength=num_bins + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(order.numel(), device=bins.device) - starts[sorted_bins]
    kept = torch.zeros(T * K, dtype=torch.bool, device=bins.device)
    kept[order] = position < capacity
    return kept.reshape(T, K) & routed_TK


def permute(x_TD: torch.Tensor, bins_TK: torch.Tensor, num_bins: int, capacity: int = -1,
            priority_TK: Optional[torch.Tensor] = None):
    """Rows of x grouped by bin (then token, then k), with capacity dropping."""
    T, K = bins_TK.shape
    kept_TK = _kept_mask(bins_TK, num_bins, capacity, priority_TK)
    flat_bins = torch.where(kept_TK, bins_TK, num_bins).reshape(-1)
    order = torch.sort(flat_bins, stable=True).indices  # by bin, then flat (t, k) index
    num_kept = int(kept_TK.sum())
    order = order[:num_kept]
    row_map = torch.full((T * K,), -1, dtype=torch.int64, device=x_TD.device)
    row_map[order] = torch.arange(num_kept, device=x_TD.device)
    x_ND = x_TD[order // K]
    counts_B = torch.bincount(flat_bins[order], minlength=num_bins).to(torch.int64)
    return x_ND, row_map.reshape(T, K), counts_B


def unpermute(y_ND: torch.Tensor, row_map_TK: torch.Tensor,
              weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * y[row_map[t, k]] over kept entries (fp32 accumulation)."""
    math = _math_dtype(y_ND.dtype)
    kept_TK = row_map_TK >= 0
    # A zero row at index N stands in for dropped entries (works even when N == 0).
    zero_row = torch.zeros((1, y_ND.shape[1]), dtype=math, device=y_ND.device)
    y_padded = torch.cat([y_ND.to(math), zero_row])
    gathered_TKD = y_padded[torch.where(kept_TK, row_map_TK, y_ND.shape[0])]
    scale_TK = kept_TK.to(math) if weights_TK is None else torch.where(
        kept_TK, weights_TK.to(math), torch.zeros((), dtype=math, device=y_ND.device))
    out_TD = (gathered_TKD * scale_TK.unsqueeze(-1)).sum(dim=1)
    return out_TD.to(y_ND.dtype)


def unpermute_backward(grad_TD: torch.Tensor, y_ND: torch.Tensor, row_map_TK: torch.Tensor,
                       weights_TK: Optional[torch.Tensor] = None):
    """Gradients of unpermute with respect to y and (when given) weights."""
    math = _math_dtype(y_ND.dtype)
    T, K = row_map_TK.shape
    kept = (row_map_TK >= 0).reshape(-1)
    rows = row_map_TK.reshape(-1)[kept]
    tokens = torch.arange(T, device=y_ND.device).repeat_interleave(K)[kept]
    grad_rows = grad_TD.to(math)[tokens]
    if weights_TK is not None:
        grad_rows = grad_rows * weights_TK.reshape(-1)[kept].to(math).unsqueeze(-1)
    grad_y = torch.zeros(y_ND.shape, dtype=math, device=y_ND.device)
    grad_y.index_add_(0, rows, grad_rows)
    grad_weights = None
    if weights_TK is not None:
        dots = (grad_TD.to(math)[tokens] * y_ND.to(math)[rows]).sum(dim=-1)
        flat = torch.zeros(T * K, dtype=math, device=y_ND.device)
        flat[kept] = dots
        grad_weights = flat.reshape(T, K).to(weights_TK.dtype)
    return grad_y.to(y_ND.dtype), grad_weights


def pack_chunks(buffer_CS: torch.Tensor, chunk_ids_n: torch.Tensor) -> torch.Tensor:
    """Gather chunk rows into one contiguous send buffer."""
    return buffer_CS[chunk_ids_n].contiguous()


def unpack_chunks(recv_nS: torch.Tensor, chunk_ids_n: torch.Tensor, out_CS: torch.Tensor) -> None:
    """out[chunk_ids[i]] = recv[i], in place."""
    out_CS[chunk_ids_n] = recv_nS


def scatter_add_chunks(recv_nS: torch.Tensor, chunk_ids_n: torch.Tensor, out_CS: torch.Tensor) -> None:
    """out[chunk_ids[i]] += recv[i], in place; repeated ids accumulate in order."""
    # The ids are read once (not one int() per row: on a GPU without the kernel, each would be
    # a host sync); index_add_ would add a repeated id's rows in no set order on a GPU.
    for i, c in enumerate(chunk_ids_n.tolist()):
        out_CS[c] += recv_nS[i]


def plan_sparse_collective(owner_C: torch.Tensor, holders_WC: torch.Tensor, rank: int):
    """The spAG exchange of one rank: (send_ids, send_counts_W, recv_ids, recv_counts_W)."""
    W, C = holders_WC.shape
    owner = owner_C.tolist()
    holders = holders_WC.tolist()
    for c, o in enumerate(owner):
        if not 0 <= o < W:
            raise ValueError(f"owner_C[{c}] = {o} is out of range [0, {W}): every chunk needs one owner")
        if not holders[o][c]:
            raise ValueError(f"owner {o} of chunk {c} is not among its holders (holders_WC[{o}, {c}] "
                             "is False): P0 must be a subset of P1")
    send_ids, send_counts, recv_ids, recv_counts = [], [0] * W, [], [0] * W
    for dst in range(W):
        if dst == rank:
            continue
        for c in range(C):
            if owner[c] == rank and holders[dst][c]:
                send_ids.append(c)
                send_counts[dst] += 1
    for src in range(W):
        if src == rank:
            continue
        for c in range(C):
            if owner[c] == src and holders[rank][c]:
                recv_ids.append(c)
                recv_counts[src] += 1

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=owner_C.device)

    return as_tensor(send_ids), as_tensor(send_counts), as_tensor(recv_ids), as_tensor(recv_counts)


# ---------------------------------------------------------------------------- attention


def attention_mask(Sq: int, Sk: int, H: int, *, causal: bool = True, window: int = 0, sinks: int = 0,
                   block_offsets: Optional[torch.Tensor] = None, block_cols: Optional[torch.Tensor] = None,
                   block_size: int = 0, device=None) -> torch.Tensor:
    """Visible (query, key) pairs per head, bool [H, Sq, Sk] (docs/ops.md, "Attention masks").

    Query row s sits at position p = s + Sk - Sq. causal: key j <= p. window w > 0: p - j < w
    (causal) or |p - j| < w. Keys j < sinks ignore the window and the block list (not causality).
    A block list keeps only the listed (query block, key block) pairs of each head.
    """
    p = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    j = torch.arange(Sk, device=device)[None, :]
    pattern = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if window > 0:
        pattern = pattern & (((p - j) if causal else (p - j).abs()) < window)
    pattern = pattern.expand(H, Sq, Sk)
    if block_offsets is not None:
        nqb = -(-Sq // block_size)
        nkb = -(-Sk // block_size)
        listed = torch.zeros(H, nqb, nkb, dtype=torch.bool, device=device)
        offs, cols = block_offsets.tolist(), block_cols.tolist()
        for h in range(H):
            for qb in range(nqb):
                for i in range(offs[h][qb], offs[h][qb + 1]):
                    listed[h, qb, cols[i]] = True
        listed = listed.repeat_interleave(block_size, 1)[:, :Sq].repeat_interleave(block_size, 2)[:, :, :Sk]
        pattern = pattern & listed
    visible = pattern | (j < sinks)
    if causal:
        visible = visible & (j <= p)
    return visible


def flash_attention(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, *,
                    scale: Optional[float] = None, causal: bool = True, window: int = 0, sinks: int = 0,
                    block_offsets: Optional[torch.Tensor] = None, block_cols: Optional[torch.Tensor] = None,
                    block_size: int = 0) -> torch.Tensor:
    """Materialised softmax attention in the math dtype; rows that see no key give 0."""
    B, H, Sq, d = q_BHSd.shape
    G, Sk = k_BGSd.shape[1], k_BGSd.shape[2]
    math = _math_dtype(q_BHSd.dtype)
    scale = d ** -0.5 if scale is None or scale <= 0 else scale
    k = k_BGSd.to(math).repeat_interleave(H // G, dim=1)
    v = v_BGSd.to(math).repeat_interleave(H // G, dim=1)
    scores = torch.matmul(q_BHSd.to(math), k.transpose(-1, -2)) * scale
    visible = attention_mask(Sq, Sk, H, causal=causal, window=window, sinks=sinks,
                             block_offsets=block_offsets, block_cols=block_cols,
                             block_size=block_size, device=q_BHSd.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1) * any_visible
    return torch.matmul(probs, v).to(q_BHSd.dtype)


def moh_attention(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                  head_idx_BSK: torch.Tensor, head_weight_BSK: torch.Tensor, *,
                  scale: Optional[float] = None, causal: bool = True, window: int = 0,
                  sinks: int = 0) -> torch.Tensor:
    """Head-routed attention: out[b, h, s] = w * attention of head h at s when the token routed
    to head h with weight w (slot of head_idx_BSK), else 0. Computed densely, then masked."""
    H = q_BHSd.shape[1]
    math = _math_dtype(q_BHSd.dtype)
    dense = flash_attention(q_BHSd, k_BGSd, v_BGSd, scale=scale, causal=causal, window=window,
                            sinks=sinks).to(math)
    chosen = head_idx_BSK >= 0
    gate_BSH = torch.zeros(*head_idx_BSK.shape[:2], H + 1, dtype=math, device=q_BHSd.device)
    gate_BSH = gate_BSH.scatter_add(2, torch.where(chosen, head_idx_BSK, H),
                                    torch.where(chosen, head_weight_BSK.to(math), 0.0))[..., :H]
    return (dense * gate_BSH.permute(0, 2, 1).unsqueeze(-1)).to(q_BHSd.dtype)


def lightning_attention(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor,
                        decay_H: torch.Tensor) -> torch.Tensor:
    """Causal linear attention with per-head decay, materialised:
    o_t = sum_{s <= t} decay_h^(t - s) (q_t . k_s) v_s, in the math dtype."""
    S = q_BHSd.shape[2]
    math = _math_dtype(q_BHSd.dtype)
    t = torch.arange(S, device=q_BHSd.device)
    dist = (t[:, None] - t[None, :]).to(math)
    log_decay = decay_H.to(math).log()[:, None, None]
    weights = torch.where(dist >= 0, torch.exp(log_decay * dist.clamp_min(0)), torch.zeros((), dtype=math))
    scores = torch.matmul(q_BHSd.to(math), k_BHSd.to(math).transpose(-1, -2)) * weights
    return torch.matmul(scores, v_BHSd.to(math)).to(q_BHSd.dtype)
