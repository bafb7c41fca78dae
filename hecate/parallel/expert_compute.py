"""Shared pieces of the dispatch -> experts -> combine path used by the strategies."""
from __future__ import annotations

import torch

from hecate import ops
from hecate.moe.experts import grouped_mlp


def run_experts(layer, x_ND: torch.Tensor, counts_G: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Grouped MLP over consecutive row blocks with the given stacked expert weights."""
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
    slots = torch.arange(G) if slot_of_G is None else slot_of_G
    slot_per_row = torch.repeat_interleave(slots.repeat(P), recv_counts_PG.reshape(-1).cpu())
    slot_per_row = slot_per_row.to(x_recv.device).unsqueeze(1)
    xg, row_map, counts = ops.permute(x_recv, slot_per_row, num_slots, -1)
    outs, row, slot = [], 0, 0
    counts_cpu = counts.cpu()
    for block, size in zip(blocks, sizes):
        if size == 0:
            continue
        block_counts = counts[slot:slot + size]
        n = int(counts_cpu[slot:slot + size].sum())
        outs.append(run_experts(layer, xg[row:row + n], block_counts, block))
        row, slot = row + n, slot + size
    yg = outs[0] if len(outs) == 1 else torch.cat(outs)
    return ops.unpermute(yg, row_map, None)
