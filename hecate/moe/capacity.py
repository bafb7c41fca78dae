"""Capacity: the ONE rule that decides how many entries each expert keeps.

Rule: tokens are decided in groups (a rank's tokens form one group). For a
group of T_g tokens, each expert keeps at most

    capacity = max(min_capacity, ceil(capacity_factor * T_g * k / E))

(token, slot) entries. Which entries survive:
  - "position"    GShard order: every token's 1st choice before any 2nd choice,
                  within one choice the lower token index first;
  - "probability" the highest routing weight first, ties: lower token, then lower slot.
Dropped entries get index -1 and weight 0 (the rest keep their weights: no
re-normalization). capacity_factor None means dropless.

`group_sizes` lets one process that holds the tokens of several ranks
(concatenated in rank order) make exactly the drops each rank makes alone.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from hecate import ops
from hecate.moe.routing import Routing


def compute_capacity(num_tokens: int, top_k: int, num_experts: int,
                     capacity_factor: float, min_capacity: int = 0) -> int:
    """max(min_capacity, ceil(capacity_factor * num_tokens * top_k / num_experts)).

    The product is rounded to 9 decimals before ceil so that e.g. 1.1 * 10 gives 11,
    not 12 (binary floating point would say 11.000000000000002).
    """
    if capacity_factor is None or not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    if num_experts <= 0:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    exact = round(capacity_factor * num_tokens * top_k / num_experts, 9)
    return max(int(min_capacity), int(math.ceil(exact)))


def check_group_sizes(group_sizes: Optional[Sequence[int]], num_tokens: int) -> list:
    """Validate group_sizes against the token count; None -> [num_tokens]."""
    if group_sizes is None:
        return [num_tokens]
    sizes = [int(s) for s in group_sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != num_tokens:
        raise ValueError(
            f"group_sizes={list(group_sizes)} must be non-negative and sum to the number of "
            f"tokens {num_tokens} (one entry per rank, in rank order)")
    return sizes


def kept_mask(indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
              capacity: int, drop_policy: str = "position") -> torch.Tensor:
    """bool [T, K]: which routed entries (index >= 0) survive `capacity` per expert."""
    t, k = indices_TK.shape
    routed = indices_TK >= 0
    if t * k == 0:
        return routed
    dev = indices_TK.device
    # Flat entry n = t*K + slot. Build the priority order of all entries, then a
    # stable sort by expert keeps that order within each expert.
    if drop_policy == "position":
        # slot-major order: (slot, token) ascending
        order = torch.arange(t * k, device=dev).view(t, k).t().reshape(-1)
    elif drop_policy == "probability":
        # weight descending; a stable sort over the natural (token, slot) order breaks ties
        order = torch.sort(weights_TK.detach().reshape(-1).float(), descending=True, stable=True).indices
    else:
        raise ValueError(f"drop_policy must be 'position' or 'probability', got {drop_policy!r}")
    experts = torch.where(routed, indices_TK, num_experts).reshape(-1)[order]
    by_expert = torch.sort(experts, stable=True)
    sorted_experts, order = by_expert.values, order[by_expert.indices]
    # Per-expert totals without a read back (bincount sizes its output from the max value).
    counts = ops.expert_histogram(sorted_experts.view(-1, 1), num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(t * k, device=dev) - starts[sorted_experts]
    kept = torch.zeros(t * k, dtype=torch.bool, device=dev)
    kept[order] = position < capacity
    return kept.view(t, k) & routed


def apply_capacity(routing: Routing, capacity_factor: Optional[float], min_capacity: int = 0,
                   drop_policy: str = "position",
                   group_sizes: Optional[Sequence[int]] = None) -> Routing:
    """Return a Routing whose over-capacity entries are dropped (index -1, weight 0).

    Capacity is computed per group from the group's token count (see module doc);
    tokens_per_expert_E (pre-drop counts) and aux losses are left unchanged.
    """
    if capacity_factor is None:
        return routing
    t, k = routing.indices_TK.shape
    e = routing.num_experts
    sizes = check_group_sizes(group_sizes, t)
    masks, start = [], 0
    for size in sizes:
        cap = compute_capacity(size, k, e, capacity_factor, min_capacity)
        sl = slice(start, start + size)
        masks.append(kept_mask(routing.indices_TK[sl], routing.weights_TK[sl], e, cap, drop_policy))
        start += size
    keep = torch.cat(masks) if masks else routing.indices_TK >= 0
    indices = torch.where(keep, routing.indices_TK, torch.full_like(routing.indices_TK, -1))
    weights = routing.weights_TK * keep.to(routing.weights_TK.dtype)
    return routing.replace(indices_TK=indices, weights_TK=weights)
