"""Pick the Hecate strategy an integration layer runs on (shared by the DeepSpeed and Megatron layers)."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from hecate.parallel.strategy import ExpertStrategy


def resolve_strategy(strategy, options: Optional[dict] = None, topology=None, ep_size: int = 1) -> ExpertStrategy:
    """An ExpertStrategy from a name (or pass one through); 'fssdp' falls back to 'local' when
    torch.distributed is not initialized; ep_size must divide the world and is the 'ep' group size."""
    if isinstance(strategy, ExpertStrategy):
        if options:
            raise ValueError("strategy_options apply only when strategy is a name, not an ExpertStrategy")
        return strategy
    from hecate.parallel import STRATEGIES, build_strategy

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be an ExpertStrategy or one of {STRATEGIES}")
    if not dist.is_initialized():
        if strategy not in ("local", "fssdp"):  # the default may fall back; an explicit choice may not
            raise ValueError(f"strategy={strategy!r} needs torch.distributed.init_process_group first "
                             "(or strategy='local')")
        return build_strategy("local")
    if topology is None:
        from hecate.comm.topology import Topology

        topology = Topology()
    world = topology.world_size
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    opts = dict(options or {})
    if strategy == "ep":
        opts.setdefault("ep_size", ep_size)
    if strategy == "local" and world > 1:
        raise ValueError(f"strategy='local' keeps every expert on one process; the world size is {world}")
    return build_strategy(strategy, topology, **opts)


def attach(layer, strategy: ExpertStrategy) -> None:
    """Hand `layer` (built with the local strategy, weights loaded) to `strategy`; layer_id
    numbers the layers one strategy instance serves (message tags, plans)."""
    layer.layer_id = getattr(strategy, "_hecate_layers_attached", 0)
    strategy._hecate_layers_attached = layer.layer_id + 1
    layer.strategy = strategy
    strategy.attach(layer)
