"""fssdp_hybrid: FSSDP inside shard groups of G ranks, replicated across W / G groups, trains
like one process (W = 4 with G = 2, W = 6 with G = 3), with replicas (spAG / spRS) in every step."""
import pytest

from hecate.comm.topology import Topology
from hecate.parallel.fssdp.hybrid import HybridFullyShardedSparse
from hecate.testing import run_distributed
from tests.training_cases import check_training, train_case

OPTIONS = {"overlap_degree": 2, "fit_replicas": False}  # replicas in every step: spAG / spRS run


@pytest.mark.parametrize("world,group", [(4, 2), (6, 3)])
def test_hybrid_trains_like_single_process(world, group):
    results = run_distributed(train_case, world, "fssdp_hybrid", {**OPTIONS, "shard_group_size": group}, 3,
                              skew=True, timeout=300)
    check_training(results)


def test_hybrid_rejects_bad_options():
    topo = Topology(rank=0, world_size=4, ranks_per_node=4)
    with pytest.raises(ValueError, match="shard_group_size=3 must be a positive divisor"):
        HybridFullyShardedSparse(topo, 3)
    with pytest.raises(ValueError, match="reshard_interval=5 is not supported"):
        HybridFullyShardedSparse(topo, 2, reshard_interval=5)
