"""fssdp's process groups come from the Topology: tokens on its group, weights on a second one.

Weight gathers (spAG, prefetch, re-gather) and gradient reduces (spRS) run on
`topology.weight_group()`, a second communicator over the same ranks, so that on NCCL they
do not queue in one stream with the token all-to-alls. These tests check on gloo that every
collective goes to the group it should, that the numbers still match one process, and that
fssdp runs inside a sub-group of the world (two independent fssdp worlds side by side).
"""
import sys

import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.testing import run_distributed
from tests.test_strategies_layer import _check, layer_case

# Replication forced on (top-3 experts everywhere, no byte pruning), re-materialization,
# asynchronous spRS: every kind of weight traffic happens.
REPLICATED = {"overlap_degree": 3, "fit_replicas": False, "rematerialize": True, "overlap_reduce": True}


def _layer_case(rank, world, topology, counts, seed, options, group=None):
    return layer_case(rank, world, topology, "fssdp", 2, None, counts, seed, options, group)


def collectives_by_group_case(rank, world):
    """Record which group each collective of one fssdp layer step is issued on, by caller."""
    calls = []
    originals = {n: getattr(dist, n) for n in ("all_to_all_single", "all_gather_into_tensor")}

    def spy(name):
        def call(*args, group=None, **kwargs):
            calls.append((sys._getframe(1).f_globals["__name__"], name, group))
            return originals[name](*args, group=group, **kwargs)
        return call

    topology = Topology()
    try:
        for name in originals:
            setattr(dist, name, spy(name))
        if hasattr(dist, "all_gather_single"):  # all_gather_flat prefers it where torch has it
            originals["all_gather_single"] = dist.all_gather_single
            dist.all_gather_single = spy("all_gather_single")
        layer, result = _layer_case(rank, world, topology, [13, 0, 21, 7], 5, dict(REPLICATED))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    s = layer.strategy
    kinds = {}
    for module, _, group in calls:
        want = "weight" if module == "hecate.comm.sparse" else "token"
        got = "weight" if group is s.weight_group else "token" if group is s.token_group else repr(group)
        kinds.setdefault(module, set()).add((want, got))
    return {
        "kinds": kinds,
        "distinct": s.weight_group is not s.token_group and s.weight_group is not None,
        "same_ranks": dist.get_process_group_ranks(s.weight_group) == list(range(world)),
        "replicated": int(layer.fssdp_state.last_plan.holders_WE.sum()) > layer.expert_layout.num_experts,
        "result": result,
    }


def test_weights_and_tokens_travel_on_separate_groups_and_match_one_process():
    results = run_distributed(collectives_by_group_case, 3)
    for r in results:
        assert r["distinct"] and r["same_ranks"] and r["replicated"]
        # Every spAG / spRS all-to-all on the weight group, every token exchange and the
        # counts all-gather on the token group; both kinds happened.
        assert r["kinds"]["hecate.comm.sparse"] == {("weight", "weight")}
        assert r["kinds"]["hecate.comm.all_to_all"] == {("token", "token")}
    _check([r["result"] for r in results], 3)


def subgroup_case(rank, world):
    """Two fssdp worlds of 2 ranks inside a world of 4, each on its own tokens."""
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    mine = halves[rank // 2]
    topology = Topology(group=mine)
    counts = [[9, 17], [0, 23]][rank // 2]  # the second half has a rank without tokens
    layer, result = _layer_case(topology.rank, topology.world_size, topology, counts, 11 + rank // 2,
                                dict(REPLICATED), group=mine)
    s = layer.strategy
    return {
        "topology": (topology.rank, topology.world_size),
        "groups": (dist.get_process_group_ranks(s.token_group), dist.get_process_group_ranks(s.weight_group)),
        "result": result,
    }


def test_fssdp_runs_inside_a_sub_group():
    results = run_distributed(subgroup_case, 4)
    for r, res in enumerate(results):
        assert res["topology"] == (r % 2, 2)
        half = [0, 1] if r < 2 else [2, 3]
        assert res["groups"] == (half, half)
    _check([res["result"] for res in results[:2]], 2)
    _check([res["result"] for res in results[2:]], 2)
