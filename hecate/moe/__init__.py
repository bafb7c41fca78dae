"""Mixture-of-Experts building blocks: config, routers, losses, capacity, experts, MoELayer,
and the strategy interface the layer calls (hecate.parallel implements it)."""
from hecate.moe.capacity import apply_capacity, compute_capacity
from hecate.moe.config import MoEConfig
from hecate.moe.experts import DenseMLP, GroupedExperts, ResidualMix, SharedExperts, grouped_mlp
from hecate.moe.layer import MoELayer, MoEOutput
from hecate.moe.metrics import MoEStats
from hecate.moe.routers import (ExpertChoiceRouter, GroupLimitedRouter, NoisyTopKRouter, Router,
                                SwitchRouter, TopKRouter, build_router)
from hecate.moe.routing import Routing
from hecate.moe.strategy import ExpertStrategy, LocalStrategy

__all__ = [
    "MoEConfig", "Routing", "MoELayer", "MoEOutput", "MoEStats", "apply_capacity", "compute_capacity",
    "GroupedExperts", "SharedExperts", "ResidualMix", "DenseMLP", "grouped_mlp", "Router", "TopKRouter",
    "SwitchRouter", "NoisyTopKRouter", "GroupLimitedRouter", "ExpertChoiceRouter", "build_router",
    "ExpertStrategy", "LocalStrategy",
]
