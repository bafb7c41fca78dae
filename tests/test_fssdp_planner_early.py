"""P1 planned while the counts all-gather is in flight (FullyShardedSparse._early_p1) is exactly
the P1 planned after it: the early plan guesses the overlap degree t from the previous step's
agreed non-MoE time and is kept only when the agreed t is the same; otherwise P1 is planned
again. Both paths are taken here (the agreed time is set so that t changes between steps)."""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.test_strategies_layer import _config

# Non-MoE microseconds every rank reports before each plan (so the agreed max is this value):
# t = floor(T * bandwidth / chunk bytes) changes with it, below and above m.
NON_MOE_US = [0, 0, 40, 40, 3, 900, 900, 12]


def _plans(rank, world, seed, overlap_counts):
    from hecate.parallel.fssdp import strategy as fssdp_strategy

    torch.manual_seed(seed)
    layer = parallelize(copy.deepcopy(MoELayer(_config(2, 4.0))),
                        build_strategy("fssdp", Topology(), fit_replicas=False, prefetch=False,
                                       overlap_counts=overlap_counts))
    gathers = []  # async_op of each counts all-gather: the option picks the path
    real_gather = fssdp_strategy.all_gather_flat

    def gather_spy(*args, async_op=False, **kwargs):
        gathers.append(async_op)
        return real_gather(*args, async_op=async_op, **kwargs)

    fssdp_strategy.all_gather_flat = gather_spy
    strategy, state = layer.strategy, layer.fssdp_state
    strategy._token_bytes = 64  # forward sets it from the tokens; the cost model prices with it
    E = layer.expert_layout.num_experts
    g = torch.Generator().manual_seed(seed + rank)
    ok = []
    for us in NON_MOE_US:
        counts_E = torch.bincount(torch.randint(0, E, (60,), generator=g), minlength=E)
        predicted = state.predictor.predict()
        state.non_moe_us = us
        plan = strategy.plan(layer, counts_E, token_bytes=64)
        # P1 of the agreed time, planned from scratch after the fact.
        policy = strategy._policy(layer.expert_layout, us * 1e-6, False)
        want = policy.plan(predicted, state.owner_E, strategy.node_of_W, strategy.capacity_m(E))
        ok.append(torch.equal(plan.holders_WE, want))
    fssdp_strategy.all_gather_flat = real_gather
    return ok, strategy.timings.get("early_p1", 0), gathers


# overlap_counts None is the default: on gloo the early P1 is planned before the all-gather.
@pytest.mark.parametrize("overlap_counts", [None, True])
def test_p1_planned_while_the_counts_travel_equals_p1_planned_after(overlap_counts):
    results = run_distributed(_plans, 2, 3, overlap_counts, timeout=120)
    for ok, early, gathers in results:
        assert gathers == [bool(overlap_counts)] * len(NON_MOE_US)
        assert all(ok)
        # The guess is right when the agreed time repeats (t unchanged), wrong when it moves.
        assert 0 < early < len(NON_MOE_US)


def _staged_prefetches(rank, world, overlap_counts):
    """Train the tiny 2-MoE-layer model with prefetch on; at every prefetch, compare the plan
    staged during the previous layer's counts all-gather with one made at issue time."""
    from hecate.parallel.fssdp.strategy import FullyShardedSparse
    from tests.training_cases import train_case

    real = FullyShardedSparse._issue_prefetch
    seen = []

    def spy(self, layer, token_bytes):
        staged = self._staged_prefetch
        if staged is not None and staged[0] is layer:
            fresh = self._prefetch_plan(layer, token_bytes)
            early = staged[1]
            same = (early is None) == (fresh is None)
            if same and fresh is not None:
                same = torch.equal(early[0], fresh[0]) and all(
                    torch.equal(getattr(early[1], k), getattr(fresh[1], k))
                    for k in ("send_ids", "recv_ids", "send_rows", "recv_rows", "owned_rows_M"))
                same = same and early[1].send_counts == fresh[1].send_counts
            seen.append(same)
        return real(self, layer, token_bytes)

    FullyShardedSparse._issue_prefetch = spy
    try:
        out = train_case(rank, world, "fssdp", {"overlap_degree": 2, "fit_replicas": False,
                                                "overlap_counts": overlap_counts}, 4, skew=True)
    finally:
        FullyShardedSparse._issue_prefetch = real
    return seen, out


@pytest.mark.parametrize("overlap_counts", [None, True])
def test_prefetch_planned_while_the_counts_travel_equals_the_one_planned_at_issue(overlap_counts):
    from tests.training_cases import check_training

    results = run_distributed(_staged_prefetches, 2, overlap_counts, timeout=180)
    check_training([out for _, out in results])
    for seen, out in results:
        assert len(seen) == 4 and all(seen)  # layer 1's prefetch, planned during layer 0's wait, every step
        assert out["timings"].get("prefetched_layers", 0) > 0
