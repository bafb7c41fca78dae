"""Topology: who is where (rank, node) and the process groups built from it.

`torch.distributed.new_group` is collective: every rank of the world must call
it, in the same order, for every group. So a Topology creates groups only in
collective methods that every rank calls identically (its constructor for node
groups, `expert_groups(ep_size)` for EP / EDP groups) and caches them; nothing
is created lazily from rank-dependent code paths, and no group has a global
string name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from hecate.comm.stats import CommStats


@dataclass(frozen=True)
class ExpertGroups:
    """Expert-parallel (EP) and expert-data-parallel (EDP) groups for one `ep_size`.

    EP groups are blocks of `ep_size` consecutive ranks (experts are split across
    them); EDP groups take one rank from each block, strided by `ep_size`
    (replicas of the same expert shard, gradients averaged across them).
    """

    ep_size: int
    rank: int
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]
    ep_group: Any = field(default=None, compare=False, repr=False)
    edp_group: Any = field(default=None, compare=False, repr=False)

    @property
    def ep_rank(self) -> int:
        """This rank's index inside its EP group."""
        return self.ep_ranks.index(self.rank)

    @property
    def edp_rank(self) -> int:
        """This rank's index inside its EDP group."""
        return self.edp_ranks.index(self.rank)


def _new_group(ranks: list[int], world_size: int, backend: str | None, parent=None, *,
               always_new: bool = False):
    """A process group over `ranks` (indices into `parent`'s ranks; the parent itself when
    they span it, unless `always_new`).

    With a parent other than the world only its members call this (local synchronization:
    ranks outside the parent take no part), in the same order on every member.
    """
    if len(ranks) == world_size and not always_new:
        return dist.group.WORLD if parent is None else parent
    if parent is None or parent is dist.group.WORLD:
        return dist.new_group(ranks=ranks, backend=backend)
    members = dist.get_process_group_ranks(parent)
    return dist.new_group(ranks=[members[r] for r in ranks], backend=backend,
                          use_local_synchronization=True)


class Topology:
    """Rank layout of the world: nodes of `ranks_per_node` consecutive ranks.

    Build it on every rank at the same point (the constructor is collective when
    the world spans several nodes and `create_groups` is true). `ranks_per_node`
    defaults to the LOCAL_WORLD_SIZE environment variable (set by torchrun), else
    the whole world is one node; pass it explicitly to fake several nodes on one
    machine. Without an initialized process group, pass `rank` and `world_size`
    (no groups are created then).
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None,
                 ranks_per_node: int | None = None, *, create_groups: bool | None = None,
                 backend: str | None = None, stats: CommStats | None = None, group=None):
        initialized = dist.is_available() and dist.is_initialized()
        if group is not None:
            # A topology of a sub-group: ranks are indices inside `group`, and every group this
            # topology creates is a sub-group of it (built by its members only).
            if not initialized:
                raise ValueError("group= needs an initialized torch.distributed process group")
            if dist.get_rank(group) < 0:
                raise ValueError(f"global rank {dist.get_rank()} is not a member of the group given "
                                 "to Topology(group=...); build a topology only on the group's ranks")
            if (rank, world_size) != (None, None) and (rank, world_size) != (
                    dist.get_rank(group), dist.get_world_size(group)):
                raise ValueError(f"rank={rank}, world_size={world_size} contradict the group "
                                 f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)}); "
                                 "pass group alone")
            rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if rank is None or world_size is None:
            if not initialized:
                raise ValueError("rank and world_size are required when torch.distributed "
                                 "is not initialized (call init_process_group first, or pass both)")
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if ranks_per_node is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            ranks_per_node = int(env) if env else world_size
        if ranks_per_node < 1 or world_size % ranks_per_node:
            raise ValueError(f"ranks_per_node={ranks_per_node} must divide world_size={world_size} "
                             "(nodes hold equal numbers of consecutive ranks)")
        self.rank = rank
        self.world_size = world_size
        self.ranks_per_node = ranks_per_node
        self.num_nodes = world_size // ranks_per_node
        self.node = rank // ranks_per_node
        self.local_rank = rank % ranks_per_node
        self.backend = backend
        # The default byte counters of the collectives issued through this topology.
        self.stats = stats if stats is not None else CommStats()
        # Lets the counters class every byte as intra- or inter-node (collectives report
        # their peers as global ranks; -1 marks ranks outside a sub-group's topology).
        members = list(range(world_size)) if group is None else dist.get_process_group_ranks(group)
        node_of = [-1] * (world_size if group is None else dist.get_world_size())
        for i, g in enumerate(members):
            node_of[g] = i // ranks_per_node
        self.stats.set_layout(members[rank], node_of)
        self._parent = group
        self._weight_group = None
        self._groups_enabled = initialized if create_groups is None else create_groups
        if self._groups_enabled and not initialized:
            raise ValueError("create_groups=True needs an initialized torch.distributed process group")
        self._expert_groups: dict[int, ExpertGroups] = {}
        self.node_group = None
        if self._groups_enabled:
            self.world_group = dist.group.WORLD if group is None else group
            # Collective: every rank creates every node's group, in node order.
            for node in range(self.num_nodes):
                node_group = _new_group(self.node_ranks(node), world_size, backend, group)
                if node == self.node:
                    self.node_group = node_group
        else:
            self.world_group = None

    def weight_group(self):
        """A second process group over the same ranks as `world_group`, for weight traffic
        (FSSDP's spAG, prefetch, re-gather, re-shard) and gradient reduces (spRS).

        On NCCL every communicator has its own stream and runs its collectives in issue
        order: with one group, a weight gather issued early would queue in front of the
        next token exchange. Collective on first call (every rank of the topology calls it
        at the same point, e.g. in a strategy's constructor); cached after. None (the
        default group) when this topology creates no groups.
        """
        if not self._groups_enabled:
            return None
        if self._weight_group is None:
            self._weight_group = _new_group(list(range(self.world_size)), self.world_size, self.backend,
                                            self._parent, always_new=True)
        return self._weight_group

    def node_of(self, rank: int) -> int:
        """The node index of `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is out of range [0, {self.world_size})")
        return rank // self.ranks_per_node

    def node_ranks(self, node: int | None = None) -> list[int]:
        """The ranks of `node` (this rank's node when None)."""
        node = self.node if node is None else node
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node={node} is out of range [0, {self.num_nodes})")
        start = node * self.ranks_per_node
        return list(range(start, start + self.ranks_per_node))

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def expert_groups(self, ep_size: int) -> ExpertGroups:
        """EP groups of `ep_size` consecutive ranks and the strided EDP groups (cached).

        Collective on first use of an `ep_size`: every rank must call it, in the same
        order relative to other group creations.
        """
        if not isinstance(ep_size, int) or ep_size < 1 or self.world_size % ep_size:
            raise ValueError(f"ep_size={ep_size!r} must be a positive divisor of world_size="
                             f"{self.world_size} (e.g. one of "
                             f"{[d for d in range(1, self.world_size + 1) if self.world_size % d == 0]})")
        if ep_size in self._expert_groups:
            return self._expert_groups[ep_size]
        num_blocks = self.world_size // ep_size
        ep_lists = [list(range(b * ep_size, (b + 1) * ep_size)) for b in range(num_blocks)]
        edp_lists = [list(range(i, self.world_size, ep_size)) for i in range(ep_size)]
        my_ep = next(g for g in ep_lists if self.rank in g)
        my_edp = next(g for g in edp_lists if self.rank in g)
        ep_group = edp_group = None
        if self._groups_enabled:
            # Same order on every rank: all EP groups, then all EDP groups.
            for ranks in ep_lists:
                group = _new_group(ranks, self.world_size, self.backend, self._parent)
                if ranks is my_ep:
                    ep_group = group
            for ranks in edp_lists:
                group = _new_group(ranks, self.world_size, self.backend, self._parent)
                if ranks is my_edp:
                    edp_group = group
        groups = ExpertGroups(ep_size, self.rank, tuple(my_ep), tuple(my_edp), ep_group, edp_group)
        self._expert_groups[ep_size] = groups
        return groups

    def __repr__(self) -> str:
        return (f"Topology(rank={self.rank}, world_size={self.world_size}, "
                f"ranks_per_node={self.ranks_per_node}, node={self.node})")
