"""Process groups, topology, collectives (all-to-all-v, sparse all-gather / reduce-scatter), byte stats."""
from hecate.comm.agreement import AgreementError, check_agreement, digest
from hecate.comm.all_to_all import all_to_all_v, exchange_splits
from hecate.comm.sparse import (
    SparsePlan,
    plan_sparse,
    sparse_all_gather,
    sparse_reduce_scatter,
)
from hecate.comm.stats import CommStats
from hecate.comm.topology import ExpertGroups, Topology

__all__ = [
    "AgreementError", "check_agreement", "digest", "all_to_all_v", "exchange_splits", "SparsePlan",
    "plan_sparse", "sparse_all_gather", "sparse_reduce_scatter", "CommStats",
    "ExpertGroups", "Topology",
]
