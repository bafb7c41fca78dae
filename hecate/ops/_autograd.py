"""Autograd for the compiled ops (the reference path differentiates through plain torch ops)."""
from __future__ import annotations

import torch

from hecate.ops._backend import op

_RENORM_EPS = 1e-20  # same clamp as the kernels and the reference


class TopkGating(torch.autograd.Function):
    """Gradient flows to the logits through the weights and the scores; indices are constant."""

    @staticmethod
    def forward(ctx, logits_TE, k, score_func, renormalize, bias_E):
        weights_TK, indices_TK, scores_TE = op("topk_gating")(logits_TE, k, score_func,
                                                              renormalize, bias_E)
        ctx.save_for_backward(indices_TK, scores_TE)
        ctx.score_func, ctx.renormalize, ctx.logits_dtype = score_func, renormalize, logits_TE.dtype
        ctx.mark_non_differentiable(indices_TK)
        return weights_TK, indices_TK, scores_TE

    @staticmethod
    def backward(ctx, grad_weights_TK, _grad_indices, grad_scores_TE):
        indices_TK, scores_TE = ctx.saved_tensors
        selected_TK = scores_TE.gather(1, indices_TK)
        grad_selected_TK = grad_weights_TK.to(scores_TE.dtype)
        if ctx.renormalize:
            # w = s / S with S = sum(s): dL/ds_j = (g_j - sum_i g_i w_i) / S
            total_T1 = selected_TK.sum(dim=1, keepdim=True).clamp_min(_RENORM_EPS)
            weights_TK = selected_TK / total_T1
            grad_selected_TK = (grad_selected_TK
                                - (grad_selected_TK * weights_TK).sum(dim=1, keepdim=True)) / total_T1
        if grad_scores_TE is not None:
            grad_s_TE = grad_scores_TE.to(scores_TE.dtype).scatter_add(1, indices_TK, grad_selected_TK)
        else:
            grad_s_TE = torch.zeros_like(scores_TE).scatter_add_(1, indices_TK, grad_selected_TK)
        # aten's fused backward kernels of softmax / sigmoid (one pass over [T, E], where the
        # spelled-out formulas take three or four): the router's backward is [T, E]-bound.
        if ctx.score_func == "softmax":
            grad_logits_TE = torch.ops.aten._softmax_backward_data(grad_s_TE, scores_TE, 1, scores_TE.dtype)
        else:
            grad_logits_TE = torch.ops.aten.sigmoid_backward(grad_s_TE, scores_TE)
        return grad_logits_TE.to(ctx.logits_dtype), None, None, None, None


class Permute(torch.autograd.Function):
    """The gradient of a permutation is the un-weighted unpermute of the row gradients."""

    @staticmethod
    def forward(ctx, x_TD, bins_TK, num_bins, capacity, priority_TK):
        x_ND, row_map_TK, counts_B = op("permute")(x_TD, bins_TK, num_bins, capacity, priority_TK)
        ctx.save_for_backward(row_map_TK)
        ctx.mark_non_differentiable(row_map_TK, counts_B)
        return x_ND, row_map_TK, counts_B

    @staticmethod
    def backward(ctx, grad_ND, _grad_row_map, _grad_counts):
        (row_map_TK,) = ctx.saved_tensors
        grad_TD = op("unpermute")(grad_ND.contiguous(), row_map_TK, None)
        return grad_TD, None, None, None, None


class Unpermute(torch.autograd.Function):
    """Backward via the fused unpermute_backward kernel (grad wrt y and weights)."""

    @staticmethod
    def forward(ctx, y_ND, row_map_TK, weights_TK):
        ctx.save_for_backward(y_ND, row_map_TK, weights_TK)
        return op("unpermute")(y_ND, row_map_TK, weights_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, row_map_TK, weights_TK = ctx.saved_tensors
        need_weights = weights_TK is not None and ctx.needs_input_grad[2]
        grad_y_ND, grad_weights_TK = op("unpermute_backward")(
            grad_TD.to(y_ND.dtype).contiguous(), y_ND, row_map_TK, weights_TK, need_weights)
        return grad_y_ND, None, (grad_weights_TK if need_weights else None)


class GatherRows(torch.autograd.Function):
    """x_ND = x_TD[tokens_N] whose backward sums each token's rows with the (deterministic)
    unpermute, like Permute's, instead of index_select's index_add (atomics on a GPU)."""

    @staticmethod
    def forward(ctx, x_TD, tokens_N, row_map_TK):
        ctx.save_for_backward(row_map_TK)
        return x_TD.index_select(0, tokens_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (row_map_TK,) = ctx.saved_tensors
        from hecate import ops  # the face picks the kernel or the reference for the device

        return ops.unpermute(grad_ND.contiguous(), row_map_TK, None), None, None
