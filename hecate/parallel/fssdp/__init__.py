"""FSSDP: the planners (pure functions) and the runtime that communicates.

Planning, pure and deterministic (no communication; every rank computes the same
result from all-gathered inputs), re-exported here: load (sliding-window load
prediction), cost (the cost model: overlap degree, plan time), materialize (P1
policies: Hecate Algorithm 1, FasterMoE-style shadowing, none), routes (which replica
serves which tokens, as sparse TokenRoutes), sharding (P0: even, heterogeneous =
Algorithm 2, re-shard moves), plan (the Plan bundle), topology (rank -> node map),
options (FssdpOptions).

Runtime, which communicates (import it from its module): strategy
(FullyShardedSparse: counts all-gather, plans, re-sharding), expert_exchange (the
autograd node: spAG, token all-to-alls, experts, spRS) and overlap (asynchronous
spAG / spRS handles).
"""
from hecate.parallel.fssdp.cost import CostModel
from hecate.parallel.fssdp.load import LoadPredictor
from hecate.parallel.fssdp.options import FssdpOptions
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
    RankLayout,
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
    "ShadowingPolicy", "fit_holders", "proportional_quota", "Plan", "build_plan", "RankLayout", "TokenRoutes",
    "balance_routes", "rank_splits", "route_tokens", "token_routes",
    "even_sharding", "heterogeneous_sharding", "reshard_if_changed", "reshard_moves",
    "slots_per_rank", "node_of_ranks", "FssdpOptions",
]
