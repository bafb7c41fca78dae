"""Expert-parallel strategies behind one interface (hecate.moe.strategy): local, dp, ep, fsdp, fssdp."""
from __future__ import annotations

from torch import nn

from hecate.parallel.strategy import ExpertStrategy

STRATEGIES = ("local", "dp", "ep", "fsdp", "fssdp", "fssdp_hybrid")


def build_strategy(name: str, topology=None, **options) -> ExpertStrategy:
    """Create a strategy by name. `topology` (hecate.comm.Topology) is required except for `local`."""
    if name not in STRATEGIES:
        import difflib

        hint = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        raise ValueError(f"parallel.strategy={name!r} is not one of {STRATEGIES}"
                         + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if name == "local":
        from hecate.parallel.local import LocalStrategy

        return LocalStrategy(**options)
    if topology is None:
        raise ValueError(f"strategy {name!r} needs a topology (hecate.comm.Topology) after init_process_group")
    if name == "dp":
        from hecate.parallel.dp import DataParallel

        return DataParallel(topology, **options)
    if name == "ep":
        from hecate.parallel.ep import ExpertParallel

        return ExpertParallel(topology, **options)
    if name == "fsdp":
        from hecate.parallel.fsdp import FullySharded

        return FullySharded(topology, **options)
    if name == "fssdp_hybrid":  # shard groups of `shard_group_size` ranks (hecate/parallel/fssdp/hybrid.py)
        from hecate.parallel.fssdp.hybrid import HybridFullyShardedSparse

        return HybridFullyShardedSparse(topology, **options)
    from hecate.parallel.fssdp.strategy import FullyShardedSparse

    return FullyShardedSparse(topology, **options)


def moe_layers(model: nn.Module) -> list:
    from hecate.moe.layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def parallelize(model: nn.Module, strategy: ExpertStrategy) -> nn.Module:
    """Hand every MoE layer of `model` to `strategy` (in module order, identical on all ranks)."""
    layers = moe_layers(model)
    for i, layer in enumerate(layers):
        layer.layer_id = i
        layer.strategy = strategy
        strategy.attach(layer)
    if hasattr(strategy, "after_attach"):
        strategy.after_attach(layers)
    return model
