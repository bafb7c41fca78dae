"""When no replica pays for itself, fssdp moves exactly what ep moves, in as many collectives.

Uniform routing on a small layer: a rank's tokens of one expert are far fewer than the bytes
of the expert's chunk (the break-even is 36 tokens here), so the byte fit prunes every
replica and P1 = P0. fssdp's owner placement (even blocks, rotated by the experts of earlier
layers: the identity when W divides E) is then ep's, every token goes to its expert's owner,
and the dispatch / combine all-to-alls (and their backward) carry the same bytes per rank as
ep's. Both issue one small count exchange per layer (ep: an all-to-all of counts, fssdp: an
all-gather of counts, non-MoE time and a state digest), so the collectives per layer are equal;
fssdp issues no spAG / spRS.
"""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.collective_spy import layer_step
from tests.test_strategies_layer import EXPERTS, _config, _inputs

_TOKENS = ("dispatch", "combine", "dispatch.backward", "combine.backward")


def _layer_traffic(rank, world, strategy, counts, seed):
    """CommStats bytes per name and the torch.distributed collectives issued by one MoE layer's
    forward and backward (counted by wrapping every collective of torch.distributed)."""
    torch.manual_seed(seed)
    base = MoELayer(_config(2, 4.0))
    topo = Topology()
    layer = parallelize(copy.deepcopy(base), build_strategy(strategy, topo))
    xs, gs = _inputs(world, counts, seed + 1)
    x = xs[rank].clone().requires_grad_(True)
    out, calls = layer_step(layer, x, gs[rank])
    return {"stats": topo.stats.snapshot(), "calls": calls,
            "replicas": layer.fssdp_state.last_plan.num_replicas if strategy == "fssdp" else 0}


@pytest.mark.parametrize("world", [2, 4])
def test_without_paying_replicas_fssdp_moves_what_ep_moves_in_as_many_collectives(world):
    assert EXPERTS % world == 0  # ep's block placement needs it; fssdp's even sharding is then ep's
    counts = [40, 36, 44, 40][:world]  # tokens per rank: far below 36 of one expert, no replica pays
    ep = run_distributed(_layer_traffic, world, "ep", counts, 7, timeout=120)
    fssdp = run_distributed(_layer_traffic, world, "fssdp", counts, 7, timeout=120)
    for rank, (e, f) in enumerate(zip(ep, fssdp)):
        assert f["replicas"] == 0, f"rank {rank}: a replica paid for itself, not the intended case"
        assert not any(n.startswith("fssdp.sp") for n in f["stats"]), sorted(f["stats"])
        for part in _TOKENS:
            for side in ("sent", "received"):
                assert f["stats"][f"fssdp.{part}"][side] == e["stats"][f"ep.{part}"][side], (rank, part, side)
        assert len(f["calls"]) == len(e["calls"]) == 5, (rank, f["calls"], e["calls"])
