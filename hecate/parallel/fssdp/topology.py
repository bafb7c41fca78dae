"""The rank -> node map the planners use for their node preferences.

The planners only need to know which ranks share a node (fast links); they take
it as an int64 tensor `node_of_W` (node index of every rank, nodes 0..N-1).
"""
from __future__ import annotations

import torch

from hecate.parallel.fssdp._checks import check_positive_int


def node_of_ranks(world_size: int, ranks_per_node: int) -> torch.Tensor:
    """Node index of every rank when ranks are packed node by node: rank // ranks_per_node.

    `world_size` must be a multiple of `ranks_per_node` (every node holds the
    same number of ranks).
    """
    world_size = check_positive_int(world_size, "world_size")
    ranks_per_node = check_positive_int(ranks_per_node, "ranks_per_node")
    if world_size % ranks_per_node:
        raise ValueError(
            f"world_size ({world_size}) must be a multiple of ranks_per_node ({ranks_per_node})"
        )
    return torch.arange(world_size, dtype=torch.int64) // ranks_per_node
