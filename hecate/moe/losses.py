"""Load-balancing losses, each a pure function of one group of tokens.

Notation: T tokens of the group, E experts, K slots per token, probs_TE the
per-token expert probabilities (sigmoid scores are normalized per token first,
see `normalized_probs`), count_i the number of (token, slot) entries routed to
expert i BEFORE capacity drops (dropped/unused slots, index -1, are ignored).
Gradients flow through probs/logits only; the counts are constants.

Gradient-accumulation rule: every loss here is a mean over the tokens of ONE
group (a rank's micro-batch). A batch is defined as the mean of its groups'
losses, so accumulating M equal micro-batches with loss/M gives exactly the
gradient of one forward over the concatenated batch with group_sizes equal to
the micro-batch sizes (tests/test_moe_losses.py). Without group_sizes the big
batch is a single group, and because f_i * P_i is a product of two means the
result differs from the accumulated one -- as it does between DP world sizes.
"""
from __future__ import annotations

import torch

from hecate import ops


def _zero(like: torch.Tensor) -> torch.Tensor:
    # A zero that stays attached to the graph so callers may always backward().
    return like.sum() * 0.0


def _fraction_routed(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_i = count_i / (T*K) as fp32 [E] (no grad)."""
    t, k = indices_TK.shape
    counts = ops.expert_histogram(indices_TK, num_experts).float()  # no read back from a device
    return counts / float(t * k)


def normalized_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-token probabilities for the losses: softmax scores as they are,
    sigmoid scores divided by their per-token sum (DeepSeek-V3)."""
    if score_func == "sigmoid":
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return scores_TE


def switch_aux_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss: L = E * sum_i f_i * P_i,
    f_i = count_i / (T*K), P_i = mean_t probs[t, i].

    Uniform routing gives exactly 1; all tokens on one expert gives up to E.
    """
    t, e = probs_TE.shape
    if t == 0 or indices_TK.shape[1] == 0:
        return _zero(probs_TE)
    f_E = _fraction_routed(indices_TK, e)
    p_E = probs_TE.float().mean(dim=0)
    return e * torch.dot(f_E, p_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): L = mean_t (logsumexp_i logits[t, i])^2."""
    if logits_TE.shape[0] == 0:
        return _zero(logits_TE)
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def expert_balance_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE expert-level balance: L = sum_i f'_i * P_i,
    f'_i = E / (K*T) * count_i, P_i = mean_t probs[t, i].

    (Numerically the Switch loss; kept separate because its coefficient, alpha1,
    is tuned separately and it pairs with the device-level loss.)
    """
    t, e = probs_TE.shape
    if t == 0 or indices_TK.shape[1] == 0:
        return _zero(probs_TE)
    f_E = _fraction_routed(indices_TK, e) * e
    return torch.dot(f_E, probs_TE.float().mean(dim=0))


def device_balance_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor,
                        num_devices: int) -> torch.Tensor:
    """DeepSeekMoE device-level balance over D equal, contiguous expert groups:
    L = sum_d f''_d * P''_d, f''_d = mean_{i in d} f'_i, P''_d = sum_{i in d} P_i.
    """
    t, e = probs_TE.shape
    if num_devices <= 0 or e % num_devices:
        raise ValueError(f"num_devices={num_devices} must be positive and divide num_experts={e}")
    if t == 0 or indices_TK.shape[1] == 0:
        return _zero(probs_TE)
    f_E = _fraction_routed(indices_TK, e) * e
    p_E = probs_TE.float().mean(dim=0)
    f_D = f_E.view(num_devices, -1).mean(dim=1)
    p_D = p_E.view(num_devices, -1).sum(dim=1)
    return torch.dot(f_D, p_D)


def seq_aux_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the sequences:
    for each sequence s of seq_len consecutive tokens,
    L_s = sum_i f_i * P_i, f_i = E / (K*seq_len) * count_i(s), P_i = mean_{t in s} probs[t, i];
    L = mean_s L_s. T must be a multiple of seq_len.
    """
    t, e = probs_TE.shape
    if seq_len <= 0 or t % seq_len:
        raise ValueError(f"seq_len={seq_len} must be positive and divide the token count {t}")
    k = indices_TK.shape[1]
    if t == 0 or k == 0:
        return _zero(probs_TE)
    n = t // seq_len
    idx_NSK = indices_TK.reshape(n, seq_len * k)
    valid = idx_NSK >= 0
    # count_i per sequence via a one-hot sum that ignores -1 entries
    onehot = torch.zeros(n, e + 1, device=indices_TK.device)
    onehot.scatter_add_(1, torch.where(valid, idx_NSK, e), torch.ones_like(idx_NSK, dtype=onehot.dtype))
    f_NE = onehot[:, :e] * (e / float(k * seq_len))
    p_NE = probs_TE.float().reshape(n, seq_len, e).mean(dim=1)
    return (f_NE * p_NE).sum(dim=1).mean()
