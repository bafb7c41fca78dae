"""`fssdp_hybrid`: FSSDP inside shard groups of G ranks, replicated across the W / G groups.

The HSDP idea applied to FSSDP: each block of G consecutive ranks (a node, or a few) runs a
full FSSDP of its own (`FullyShardedSparse` on a Topology of the block): the experts are
sharded over its G ranks, P1, the token routes and every token exchange stay inside it. The
W / G blocks hold the same owner placement (the same rotation of the even sharding), so the
rank with shard index i of every block owns the same chunks; after the block's spRS, those
ranks all-reduce their owned rows' gradients (the replica group: ranks i, i + G, ...), and the
optimizer steps identical rows everywhere.

Why: with W much larger than E, one owner per chunk across the whole world leaves the hot
experts' tokens crossing the slow links to a single rank; with shard groups the tokens never
leave the block, and only gradients (once per step) cross between blocks.

Re-sharding (Algorithm 2) would place owners from each block's own load, so blocks would
disagree; it is not supported here (`reshard_interval` must be 0, the default of this strategy).
"""
from __future__ import annotations

import torch

from hecate.comm.all_to_all import all_reduce_coalesced
from hecate.comm.topology import Topology
from hecate.parallel.fssdp.strategy import FullyShardedSparse
from hecate.parallel.strategy import ExpertStrategy


class HybridFullyShardedSparse(ExpertStrategy):
    """Options: `shard_group_size` G (a divisor of W), plus every `parallel.fssdp` option."""

    name = "fssdp_hybrid"

    def __init__(self, topology, shard_group_size: int, options=None, **overrides):
        W = topology.world_size
        G = shard_group_size
        if not isinstance(G, int) or G < 1 or W % G:
            raise ValueError(f"fssdp_hybrid: shard_group_size={G!r} must be a positive divisor of the world "
                             f"size {W} (e.g. one of {[d for d in range(1, W + 1) if W % d == 0]})")
        reshard = overrides.get("reshard_interval", options.reshard_interval if options is not None else 0)
        if reshard:
            raise ValueError(f"fssdp_hybrid: reshard_interval={reshard} is not supported (each shard group "
                             "would place owners from its own load and the groups' rows would no longer "
                             "match); set parallel.fssdp.reshard_interval=0")
        overrides["reshard_interval"] = 0
        rpn = topology.ranks_per_node
        if (G <= rpn and rpn % G) or (G > rpn and G % rpn):
            raise ValueError(f"fssdp_hybrid: shard_group_size={G} must divide the {rpn} ranks of a node or be "
                             "a multiple of them (shard groups are whole nodes or parts of one node)")
        self.topology = topology
        self.shard_group_size, self.replicas = G, W // G
        # EP groups of size G are exactly the shard blocks, EDP groups the replica groups
        # (collective, cached by the topology).
        self.groups = topology.expert_groups(G)
        shard_topo = Topology(group=self.groups.ep_group, ranks_per_node=min(G, rpn), stats=topology.stats)
        # The sub-topology set the shared counters' layout to its members; collectives report
        # peers as global ranks, so the world's layout classifies every byte.
        topology.stats.set_layout(topology.rank, [r // rpn for r in range(W)])
        self.inner = FullyShardedSparse(shard_topo, options, **overrides)

    @property
    def timings(self) -> dict:
        return self.inner.timings

    @property
    def overlap_dense_gather(self):
        # The Engine reads this for its ZeRO-1 gather; the option lives on the inner strategy.
        return self.inner.overlap_dense_gather

    def expert_replication(self) -> int:
        return self.replicas

    def attach(self, layer) -> None:
        self.inner.attach(layer)

    def after_attach(self, layers) -> None:
        self.inner.after_attach(layers)

    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        return self.inner.forward(layer, x_TD, routing)

    def expert_parameters(self, layer):
        return self.inner.expert_parameters(layer)

    def finish_backward(self, layers) -> None:
        """The block's spRS (owners' rows summed over the block, / G), then one all-reduce of
        every owned row over the replica group (/ W/G): the sum over the world / W."""
        layers = list(layers)
        self.inner.finish_backward(layers)
        if self.replicas == 1:
            return
        grads = [layer.expert_chunks.grad for layer in layers]
        all_reduce_coalesced(grads, group=self.groups.edp_group, stats=self.topology.stats,
                             name="fssdp.replica_all_reduce", ranks=self.groups.edp_ranks)
        for g in grads:
            g /= self.replicas

    def gather_experts(self, layer, grads: bool = False):
        return self.inner.gather_experts(layer, grads)

    def load_experts(self, layer, full) -> None:
        self.inner.load_experts(layer, full)

    def step_end(self, layers, optimizer=None) -> bool:
        return self.inner.step_end(layers, optimizer)

    def persistent_bytes(self, layer, optimizer=None) -> int:
        return self.inner.persistent_bytes(layer, optimizer)
