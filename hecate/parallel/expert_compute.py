"""Shared pieces of the dispatch -> experts -> combine path used by the strategies."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from hecate import ops
from hecate.moe.experts import grouped_mlp


def recomputed(layer, fn, *inputs):
    """fn(*inputs); under activation checkpointing (`layer.recompute_experts`, set by
    hecate.models.checkpointing while strategy.forward runs) its activations (the expert MLP's
    hidden layer) are not kept but recomputed in backward (torch.utils.checkpoint,
    non-reentrant: gradients also reach the weights fn reads).

    fn must not communicate: a collective re-run from inside the autograd engine could meet
    its peers in a different order. The strategies call it around their local expert compute
    only, with the gathers and all-to-alls outside.
    """
    if getattr(layer, "recompute_experts", False) and torch.is_grad_enabled():
        return checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def run_experts(layer, x_ND: torch.Tensor, counts_G: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Grouped MLP over consecutive row blocks with the given stacked expert weights."""
    custom = getattr(layer.experts, "grouped_forward", None)
    if custom is not None:  # experts built from a user's nn.Module (hecate.moe.module_experts)
        return custom(x_ND, counts_G, weights)
    return grouped_mlp(x_ND, counts_G, weights["w1_EFD"], weights["w2_EDF"], weights.get("w3_EFD"),
                       layer.config.activation)


def experts_on_received(layer, x_recv: torch.Tensor, recv_counts_PG: torch.Tensor,
                        weights, slot_of_G: torch.Tensor | None = None) -> torch.Tensor:
    """Run experts on rows received from P peers, each peer's rows ordered by expert.

    recv_counts_PG[p, g]: rows from peer p for local expert g (or for global expert g
    mapped to local slot slot_of_G[g]). Rows are regrouped by local slot, computed,
    and returned in arrival order, so the reply all-to-all mirrors the request.

    weights: stacked expert weights {name: [slots, ...]}, or a list of such blocks whose
    slots follow one another (FSSDP computes its owned rows and its received replicas
    in place, without stacking them into one copy): one grouped MLP per block.
    """
    blocks = [weights] if isinstance(weights, dict) else list(weights)
    sizes = [next(iter(b.values())).shape[0] for b in blocks]
    num_slots = sum(sizes)
    if num_slots == 0:  # this rank holds no expert (fssdp after re-sharding), so it gets no rows
        if x_recv.shape[0]:
            raise ValueError(f"{x_recv.shape[0]} rows arrived at a rank that holds no expert")
        return x_recv.new_zeros(x_recv.shape)
    P, G = recv_counts_PG.shape
    # Everything about the row layout is known on the host from the plan's counts: which
    # slot each arriving block goes to and how many rows each slot gets. Only the per-row
    # slot ids are built on the device (repeat_interleave with its output size given), so
    # nothing is read back from it.
    counts_PG = recv_counts_PG.detach().cpu().to(torch.int64)
    slots = torch.arange(G) if slot_of_G is None else slot_of_G.detach().cpu()
    slots_PG = slots.repeat(P)
    counts_S = torch.zeros(num_slots, dtype=torch.int64).index_add_(0, slots_PG, counts_PG.reshape(-1))
    num_rows = int(counts_PG.sum())
    if num_rows != x_recv.shape[0]:
        raise ValueError(f"recv_counts_PG sums to {num_rows} rows but {x_recv.shape[0]} arrived")
    device = x_recv.device
    slot_per_row = torch.repeat_interleave(ops.to_device(slots_PG, device),
                                           ops.to_device(counts_PG.reshape(-1), device),
                                           output_size=num_rows).unsqueeze(1)
    xg, row_map, _ = ops.permute(x_recv, slot_per_row, num_slots, -1, num_rows=num_rows)
    outs, row, slot = [], 0, 0
    for block, size in zip(blocks, sizes):
        if size == 0:
            continue
        block_counts = counts_S[slot:slot + size]  # host counts: no read for splits or offsets
        n = int(block_counts.sum())
        outs.append(run_experts(layer, xg[row:row + n], block_counts, block))
        row, slot = row + n, slot + size
    yg = outs[0] if len(outs) == 1 else torch.cat(outs)
    return ops.unpermute(yg, row_map, None)
