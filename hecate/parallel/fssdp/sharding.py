"""Owner placement P0: even sharding and the paper's heterogeneous sharding (Algorithm 2).

A chunk is one expert of one MoE layer. Every chunk has exactly one owner, and
every rank owns the same number of chunks over all layers (within one), so
parameter and optimizer memory stays balanced while one layer's experts may
sit unevenly (a shard holds 0..E experts of a layer) to follow the load.
"""
from __future__ import annotations

import numpy as np
import torch

from hecate.parallel.fssdp._checks import check_nonnegative, check_positive_int, to_numpy
from hecate.parallel.fssdp.materialize import hottest


def even_sharding(num_experts: int, world_size: int) -> torch.Tensor:
    """owner_E (int64 [E]): contiguous blocks, the first E % W ranks own one extra expert."""
    E = check_positive_int(num_experts, "num_experts")
    W = check_positive_int(world_size, "world_size")
    per_rank = np.full(W, E // W, dtype=np.int64)
    per_rank[: E % W] += 1
    return torch.from_numpy(np.repeat(np.arange(W, dtype=np.int64), per_rank))


def slots_per_rank(total_chunks: int, world_size: int, ranks_per_node: int) -> np.ndarray:
    """Chunks each rank owns: total // W each; the remainder goes one per rank,
    taking local rank 0 of every node first, then local rank 1, ... (spread over nodes)."""
    slots = np.full(world_size, total_chunks // world_size, dtype=np.int64)
    ranks = np.arange(world_size)
    order = np.lexsort((ranks // ranks_per_node, ranks % ranks_per_node))
    slots[order[: total_chunks % world_size]] += 1
    return slots


def _t_array(t_per_layer, L: int) -> np.ndarray:
    if isinstance(t_per_layer, (int, np.integer)) and not isinstance(t_per_layer, bool):
        t = np.full(L, int(t_per_layer), dtype=np.int64)
    else:
        t = to_numpy(t_per_layer, "t_per_layer", ndim=1, shape=(L,))
    check_nonnegative(t, "t_per_layer")
    return t


def heterogeneous_sharding(loads_LE, num_ranks: int, ranks_per_node: int,
                           t_per_layer=0) -> torch.Tensor:
    """Algorithm 2: load-aware owner placement over all MoE layers, owner_LE (int64 [L, E]).

    loads_LE: float [L, E] observed load per layer and expert (non-negative).
    t_per_layer: int or int [L]; each layer's top-t experts (load > 0) are set
    aside: they are replicated on every rank anyway, so where they are owned
    does not affect compute balance. Pass t only for layers whose plan
    replicates its top-t experts everywhere (t <= m), else 0.

    Steps: equal slots per rank (`slots_per_rank`); layers by highest max
    load first (ties: lower layer); within a layer experts by load descending
    (ties: lower index), each to the least-loaded node with a free slot, then
    its least-loaded rank with a free slot (ties: fewer free slots, then lower
    node / rank), where load counts only this layer's placed experts; finally
    the set-aside experts fill the remaining slots, each on the rank with the
    most free slots (ties: lower rank).
    """
    loads = to_numpy(loads_LE, "loads_LE", ndim=2, dtype=np.float64)
    check_nonnegative(loads, "loads_LE")
    L, E = loads.shape
    if L == 0 or E == 0:
        raise ValueError(f"loads_LE must have at least one layer and expert, got shape {(L, E)}")
    W = check_positive_int(num_ranks, "num_ranks")
    rpn = check_positive_int(ranks_per_node, "ranks_per_node")
    if W % rpn:
        raise ValueError(f"num_ranks ({W}) must be a multiple of ranks_per_node ({rpn})")
    t = _t_array(t_per_layer, L)

    free_W = slots_per_rank(L * E, W, rpn)
    node_of_W = np.arange(W) // rpn
    num_nodes = W // rpn
    ranks = np.arange(W)
    nodes = np.arange(num_nodes)
    owner = np.full((L, E), -1, dtype=np.int64)
    set_aside = [hottest(loads[l], int(t[l])) for l in range(L)]
    layer_order = np.lexsort((np.arange(L), -loads.max(axis=1)))

    for l in layer_order:
        aside = np.zeros(E, dtype=np.bool_)
        aside[set_aside[l]] = True
        dev_load = np.zeros(W)
        for e in np.lexsort((np.arange(E), -loads[l])):
            if aside[e]:
                continue
            has_free = free_W > 0
            node_load = np.bincount(node_of_W, weights=dev_load, minlength=num_nodes)
            node_free = np.bincount(node_of_W, weights=free_W, minlength=num_nodes)
            n = np.lexsort((nodes, node_free, node_load, ~(node_free > 0)))[0]
            ok = has_free & (node_of_W == n)
            d = np.lexsort((ranks, free_W, dev_load, ~ok))[0]
            owner[l, e] = d
            free_W[d] -= 1
            dev_load[d] += loads[l, e]

    for l in layer_order:
        for e in set_aside[l]:
            d = np.lexsort((ranks, -free_W))[0]
            owner[l, e] = d
            free_W[d] -= 1
    assert (owner >= 0).all() and (free_W == 0).all()
    return torch.from_numpy(owner)


def reshard_moves(old_owner_LE, new_owner_LE) -> list[tuple[int, int, int, int]]:
    """Chunks to move: [(layer, expert, src_rank, dst_rank)] in (layer, expert) order; [] if unchanged."""
    old = to_numpy(old_owner_LE, "old_owner_LE", ndim=2)
    new = to_numpy(new_owner_LE, "new_owner_LE", ndim=2, shape=old.shape)
    return [(int(l), int(e), int(old[l, e]), int(new[l, e]))
            for l, e in np.argwhere(old != new)]


def reshard_if_changed(old_owner_LE, loads_LE, num_ranks: int, ranks_per_node: int,
                       t_per_layer=0) -> torch.Tensor | None:
    """Run Algorithm 2; return the new owner_LE, or None when it equals the old one."""
    new = heterogeneous_sharding(loads_LE, num_ranks, ranks_per_node, t_per_layer)
    old = to_numpy(old_owner_LE, "old_owner_LE", ndim=2, shape=tuple(new.shape))
    return None if np.array_equal(old, new.numpy()) else new
