"""Python face of the hecate._C operators (docs/ops.md).

Each function validates its input (ValueError / TypeError naming the argument),
runs the compiled kernel for the tensor's device when hecate._C provides one and
the plain-PyTorch reference (`hecate.ops.reference`) otherwise, and is
differentiable where a training step differentiates it.
"""
from __future__ import annotations

from typing import Optional

import torch

from hecate.ops import _validate as check
from hecate.ops import reference
from hecate.ops._autograd import GatherRows, Permute, TopkGating, Unpermute
from hecate.ops._backend import extension_available, op, reference_runs, use_extension

__all__ = [
    "extension_available", "reference", "topk_gating", "expert_histogram", "permute", "unpermute",
    "unpermute_backward", "pack_chunks", "unpack_chunks", "scatter_add_chunks",
    "plan_sparse_collective", "permute_known_rows", "to_device",
]

_SCORE_FUNCS = ("softmax", "sigmoid")

extension_available()  # registers torch.ops.hecate.* when hecate._C is built


def _device_path(device: torch.device) -> bool:
    """Whether `device` takes the paths that avoid host reads (every accelerator; the CPU
    reads values for free, so it keeps its kernels and immediate checks)."""
    return device.type != "cpu"


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def topk_gating(logits_TE: torch.Tensor, k: int, score_func: str = "softmax",
                renormalize: bool = True, bias_E: Optional[torch.Tensor] = None):
    """Route each token to its top-k experts.

    Returns (weights_TK, indices_TK int64, scores_TE): scores are softmax or sigmoid of the logits
    in fp32 (fp64 for fp64 logits); selection ranks scores + bias_E (bias only steers selection);
    weights are the unbiased scores of the chosen experts, divided by their sum when `renormalize`.
    Ties go to the lower expert index; indices are in descending order of selection value.
    Differentiable with respect to the logits through weights and scores.
    """
    check.tensor("logits_TE", logits_TE, 2, floating=True)
    E = logits_TE.shape[1]
    check.integer("k", k, minimum=1)
    if k > E:
        raise ValueError(f"k = {k} exceeds the number of experts E = {E} (logits_TE shape "
                         f"{tuple(logits_TE.shape)}); use k <= E")
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {_SCORE_FUNCS}, got {score_func!r}")
    if bias_E is not None:
        check.tensor("bias_E", bias_E, 1, floating=True)
        check.shape("bias_E", bias_E, (E,), "one entry per expert")
        check.same_device(logits_TE=logits_TE, bias_E=bias_E)
    renormalize = bool(renormalize)
    if not use_extension("topk_gating", logits_TE.device):
        reference_runs("topk_gating", logits_TE.device)
        return reference.topk_gating(logits_TE, k, score_func, renormalize, bias_E)
    if _needs_grad(logits_TE):
        return TopkGating.apply(logits_TE, k, score_func, renormalize, bias_E)
    return op("topk_gating")(logits_TE, k, score_func, renormalize, bias_E)


def expert_histogram(indices_TK: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Entries per bin (int64, length num_bins); negative entries (dropped / unrouted) are ignored."""
    check.tensor("indices_TK", indices_TK, 2, integer=True)
    check.integer("num_bins", num_bins, minimum=1)
    check.below("indices_TK", indices_TK, num_bins, "num_bins", allow_negative=True)
    if not use_extension("expert_histogram", indices_TK.device):
        reference_runs("expert_histogram", indices_TK.device)
        return reference.expert_histogram(indices_TK, num_bins)
    return op("expert_histogram")(indices_TK, num_bins)


def permute(x_TD: torch.Tensor, bins_TK: torch.Tensor, num_bins: int, capacity: int = -1,
            priority_TK: Optional[torch.Tensor] = None, num_rows: Optional[int] = None):
    """Group token rows by destination bin: returns (x_ND, row_map_TK int64, counts_B int64).

    Rows are ordered by bin, then token, then k; x_ND holds only kept entries (N = counts_B.sum()).
    capacity < 0 is dropless; otherwise each bin keeps at most `capacity` entries, by position
    (GShard order: all 1st choices before any 2nd choice, lower token first) when priority_TK is
    None, else the highest priority (ties: lower token, then lower k). row_map_TK[t, k] is the row
    of x_ND holding (t, k), or -1 when dropped or when bins_TK[t, k] < 0. Differentiable in x_TD.

    num_rows: the number of entries with bins_TK >= 0, when the caller knows it on the host
    (dropless only). N is data dependent, so the kernel reads it back from the device (a
    host-device sync); with num_rows an accelerator takes a path that reads nothing. It
    must be exact: checked at once on the CPU, queued on the device elsewhere.
    """
    check.tensor("x_TD", x_TD, 2)
    check.tensor("bins_TK", bins_TK, 2, integer=True)
    if bins_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"bins_TK has {bins_TK.shape[0]} rows but x_TD has {x_TD.shape[0]} tokens; "
                         "they must agree (one row of bins per token)")
    check.integer("num_bins", num_bins, minimum=1)
    check.integer("capacity", capacity)
    if priority_TK is not None:
        check.tensor("priority_TK", priority_TK, 2, floating=True)
        check.shape("priority_TK", priority_TK, bins_TK.shape, "same as bins_TK")
    check.same_device(x_TD=x_TD, bins_TK=bins_TK, priority_TK=priority_TK)
    check.below("bins_TK", bins_TK, num_bins, "num_bins", allow_negative=True)
    if num_rows is not None:
        check.integer("num_rows", num_rows, minimum=0, maximum=bins_TK.numel())
        if capacity >= 0 or priority_TK is not None:
            raise ValueError("num_rows is for dropless permutes (capacity < 0, no priority_TK): with "
                             "capacity the kept count is decided inside permute")
        if _device_path(x_TD.device):
            return permute_known_rows(x_TD, bins_TK, num_bins, num_rows)
    if not use_extension("permute", x_TD.device):
        reference_runs("permute", x_TD.device)
        return reference.permute(x_TD, bins_TK, num_bins, capacity, priority_TK)
    if _needs_grad(x_TD):
        out = Permute.apply(x_TD, bins_TK, num_bins, capacity, priority_TK)
    else:
        out = op("permute")(x_TD, bins_TK, num_bins, capacity, priority_TK)
    if num_rows is not None and out[0].shape[0] != num_rows:  # the host: reading is free
        raise ValueError(f"num_rows = {num_rows} but bins_TK has {out[0].shape[0]} entries >= 0; "
                         "pass the exact count (or None)")
    return out


def permute_known_rows(x_TD: torch.Tensor, bins_TK: torch.Tensor, num_bins: int, num_rows: int):
    """permute (dropless) when the kept row count is known on the host: a stable sort of the
    bins and a row gather, with no value read back (the accelerator path of `permute`)."""
    T, K = bins_TK.shape
    device = bins_TK.device
    flat = bins_TK.reshape(-1)
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, num_bins))  # unrouted entries sort last
    # The exact count, checked without a read (an error at the next synchronization).
    torch._assert_async(valid.sum() == num_rows, f"permute: num_rows = {num_rows} is not the "
                        "number of entries of bins_TK that are >= 0")
    order = torch.sort(key, stable=True).indices[:num_rows]  # by bin, then (t, k)
    row_map = torch.full((T * K,), -1, dtype=torch.int64, device=device)
    row_map.scatter_(0, order, torch.arange(num_rows, device=device))
    row_map_TK = row_map.view(T, K)
    counts_B = torch.zeros(num_bins + 1, dtype=torch.int64, device=device)
    counts_B.scatter_add_(0, key, torch.ones_like(key))
    tokens_N = torch.div(order, K, rounding_mode="floor")
    if _needs_grad(x_TD):
        x_ND = GatherRows.apply(x_TD, tokens_N, row_map_TK)
    else:
        x_ND = x_TD.index_select(0, tokens_N)
    return x_ND, row_map_TK, counts_B[:num_bins]


def _check_unpermute_args(y_ND, row_map_TK, weights_TK):
    check.tensor("y_ND", y_ND, 2, floating=True)
    check.tensor("row_map_TK", row_map_TK, 2, integer=True)
    if weights_TK is not None:
        check.tensor("weights_TK", weights_TK, 2, floating=True)
        check.shape("weights_TK", weights_TK, row_map_TK.shape, "same as row_map_TK")
    check.same_device(y_ND=y_ND, row_map_TK=row_map_TK, weights_TK=weights_TK)
    check.below("row_map_TK", row_map_TK, y_ND.shape[0], "the rows of y_ND", allow_negative=True)


def unpermute(y_ND: torch.Tensor, row_map_TK: torch.Tensor,
              weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_TD[t] = sum_k weights[t, k] * y_ND[row_map[t, k]] over kept entries (row_map >= 0).

    Accumulates in fp32 and returns y's dtype; weights None means 1. Differentiable in y and weights.
    """
    _check_unpermute_args(y_ND, row_map_TK, weights_TK)
    if not use_extension("unpermute", y_ND.device):
        reference_runs("unpermute", y_ND.device)
        return reference.unpermute(y_ND, row_map_TK, weights_TK)
    if _needs_grad(y_ND, weights_TK):
        return Unpermute.apply(y_ND, row_map_TK, weights_TK)
    return op("unpermute")(y_ND, row_map_TK, weights_TK)


def unpermute_backward(grad_TD: torch.Tensor, y_ND: torch.Tensor, row_map_TK: torch.Tensor,
                       weights_TK: Optional[torch.Tensor] = None):
    """(grad_y_ND, grad_weights_TK or None) of unpermute; every row of y is referenced at most once."""
    _check_unpermute_args(y_ND, row_map_TK, weights_TK)
    check.tensor("grad_TD", grad_TD, 2, floating=True)
    check.shape("grad_TD", grad_TD, (row_map_TK.shape[0], y_ND.shape[1]), "(tokens of row_map_TK, "
                "hidden size of y_ND)")
    check.same_device(y_ND=y_ND, grad_TD=grad_TD)
    if not use_extension("unpermute_backward", y_ND.device):
        reference_runs("unpermute_backward", y_ND.device)
        return reference.unpermute_backward(grad_TD, y_ND, row_map_TK, weights_TK)
    return op("unpermute_backward")(grad_TD.to(y_ND.dtype), y_ND, row_map_TK, weights_TK,
                                    weights_TK is not None)


def _check_chunk_ids(chunk_ids_n: torch.Tensor, num_chunks: int) -> None:
    check.tensor("chunk_ids_n", chunk_ids_n, 1, integer=True)
    check.below("chunk_ids_n", chunk_ids_n, num_chunks, "the number of chunks", allow_negative=False)


def pack_chunks(buffer_CS: torch.Tensor, chunk_ids_n: torch.Tensor) -> torch.Tensor:
    """Gather rows buffer_CS[chunk_ids_n[i]] into one contiguous (n, S) send buffer."""
    check.tensor("buffer_CS", buffer_CS, 2)
    check.tensor("chunk_ids_n", chunk_ids_n, 1, integer=True)
    check.same_device(buffer_CS=buffer_CS, chunk_ids_n=chunk_ids_n)
    _check_chunk_ids(chunk_ids_n, buffer_CS.shape[0])
    if not use_extension("pack_chunks", buffer_CS.device):
        reference_runs("pack_chunks", buffer_CS.device)
        return reference.pack_chunks(buffer_CS, chunk_ids_n)
    return op("pack_chunks")(buffer_CS, chunk_ids_n)


def _check_unpack_args(recv_nS, chunk_ids_n, out_CS):
    check.tensor("recv_nS", recv_nS, 2)
    check.tensor("out_CS", out_CS, 2)
    check.tensor("chunk_ids_n", chunk_ids_n, 1, integer=True)
    check.shape("recv_nS", recv_nS, (chunk_ids_n.shape[0], out_CS.shape[1]),
                "(len(chunk_ids_n), chunk size of out_CS)")
    if recv_nS.dtype != out_CS.dtype:
        raise ValueError(f"recv_nS has dtype {recv_nS.dtype} but out_CS has {out_CS.dtype}; they must match")
    if not out_CS.is_contiguous():
        raise ValueError("out_CS must be contiguous (it is written in place)")
    check.same_device(out_CS=out_CS, recv_nS=recv_nS, chunk_ids_n=chunk_ids_n)
    _check_chunk_ids(chunk_ids_n, out_CS.shape[0])


def unpack_chunks(recv_nS: torch.Tensor, chunk_ids_n: torch.Tensor, out_CS: torch.Tensor) -> None:
    """out_CS[chunk_ids_n[i]] = recv_nS[i], in place."""
    _check_unpack_args(recv_nS, chunk_ids_n, out_CS)
    if not use_extension("unpack_chunks", out_CS.device):
        reference_runs("unpack_chunks", out_CS.device)
        return reference.unpack_chunks(recv_nS, chunk_ids_n, out_CS)
    op("unpack_chunks")(recv_nS, chunk_ids_n, out_CS)


def scatter_add_chunks(recv_nS: torch.Tensor, chunk_ids_n: torch.Tensor, out_CS: torch.Tensor) -> None:
    """out_CS[chunk_ids_n[i]] += recv_nS[i], in place; repeated ids accumulate in order of i."""
    _check_unpack_args(recv_nS, chunk_ids_n, out_CS)
    if not use_extension("scatter_add_chunks", out_CS.device):
        reference_runs("scatter_add_chunks", out_CS.device)
        return reference.scatter_add_chunks(recv_nS, chunk_ids_n, out_CS)
    op("scatter_add_chunks")(recv_nS, chunk_ids_n, out_CS)


def plan_sparse_collective(owner_C: torch.Tensor, holders_WC: torch.Tensor, rank: int):
    """The spAG exchange of `rank`: (send_ids, send_counts_W, recv_ids, recv_counts_W), all int64.

    Sends each chunk it owns to every other holder (destinations ascending, chunks ascending within
    one); receives every chunk it holds but does not own (sources ascending, chunks ascending).
    spRS uses the same plan with send and receive swapped. Raises ValueError when a chunk's owner is
    out of range or is not among its holders. Results live on owner_C's device.
    """
    check.tensor("owner_C", owner_C, 1, integer=True)
    check.tensor("holders_WC", holders_WC, 2, boolean=True)
    W, C = holders_WC.shape
    check.shape("owner_C", owner_C, (C,), "one owner per chunk column of holders_WC")
    check.integer("rank", rank, minimum=0, maximum=W - 1)
    check.same_device(owner_C=owner_C, holders_WC=holders_WC)
    device = owner_C.device
    owner_cpu, holders_cpu = owner_C.cpu(), holders_WC.cpu()  # a tiny host-side computation
    if use_extension("plan_sparse_collective", torch.device("cpu")):
        plan = op("plan_sparse_collective")(owner_cpu, holders_cpu, rank)
    else:
        plan = reference.plan_sparse_collective(owner_cpu, holders_cpu, rank)
    return tuple(t.to(device) for t in plan)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (plan indices, split sizes) on `device`: through pinned memory without
    blocking the host on an accelerator (a pageable copy is staged synchronously); as is
    when it is already there. Call once per plan, not once per use."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

# Attention kernels (hecate/ops/attention.py): flash_attention, moh_attention, BlockSparse.
from hecate.ops.attention import BlockSparse, flash_attention, moh_attention  # noqa: E402

__all__ += ["BlockSparse", "flash_attention", "moh_attention"]
