"""FSSDP planning: pure, deterministic algorithms (no communication).

load: sliding-window load prediction. cost: the cost model (overlap degree,
plan time). materialize: P1 policies (Hecate Algorithm 1, FasterMoE-style
shadowing, none). routes: which replica serves which tokens (sparse TokenRoutes). sharding: P0
(even, heterogeneous = Algorithm 2, re-shard moves). plan: the Plan bundle.
"""
from hecate.parallel.fssdp.cost import CostModel
from hecate.parallel.fssdp.load import LoadPredictor
from hecate.parallel.fssdp.materialize import (
    HecatePolicy,
    MaterializationPolicy,
    NoReplicationPolicy,
    ShadowingPolicy,
    fit_holders,
    proportional_quota,
)
from hecate.parallel.fssdp.plan import Plan, build_plan
from hecate.parallel.fssdp.routes import (
    TokenRoutes,
    balance_routes,
    rank_splits,
    route_tokens,
    token_routes,
)
from hecate.parallel.fssdp.sharding import (
    even_sharding,
    heterogeneous_sharding,
    reshard_if_changed,
    reshard_moves,
    slots_per_rank,
)
from hecate.parallel.fssdp.topology import node_of_ranks

__all__ = [
    "CostModel", "LoadPredictor", "HecatePolicy", "MaterializationPolicy", "NoReplicationPolicy",
    "ShadowingPolicy", "fit_holders", "proportional_quota", "Plan", "build_plan", "TokenRoutes",
    "balance_routes", "rank_splits", "route_tokens", "token_routes",
    "even_sharding", "heterogeneous_sharding", "reshard_if_changed", "reshard_moves",
    "slots_per_rank", "node_of_ranks",
]
