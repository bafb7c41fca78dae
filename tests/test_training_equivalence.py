"""A small MoE transformer trained for several steps under each strategy equals a single
process with all experts local, step by step (losses) and at the end (every parameter)."""
import pytest

from hecate.testing import run_distributed
from tests.training_cases import check_training, train_case


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fssdp_trains_like_single_process(world):
    results = run_distributed(train_case, world, "fssdp", {"overlap_degree": 2, "fit_replicas": False}, 6)
    check_training(results)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["dp", "ep", "fsdp"])
def test_baselines_train_like_single_process(world, strategy):
    results = run_distributed(train_case, world, strategy, {}, 5)
    check_training(results)


def test_fssdp_reshard_in_the_middle_changes_nothing():
    results = run_distributed(train_case, 4, "fssdp", {"overlap_degree": 1, "reshard_interval": 3, "fit_replicas": False}, 7,
                              skew=True, timeout=240)
    assert results[0]["reshards"] >= 1, "the skewed load should have moved some owners"
    check_training(results)


@pytest.mark.parametrize("rematerialize,overlap_reduce", [(True, True), (False, True), (True, False)])
def test_fssdp_rematerialization_and_overlap_on_and_off(rematerialize, overlap_reduce):
    results = run_distributed(train_case, 3, "fssdp", {"overlap_degree": 2, "rematerialize": rematerialize,
                                                       "overlap_reduce": overlap_reduce,
                                                       "fit_replicas": False}, 5, skew=True)
    check_training(results)


def test_fssdp_with_capacity_drops():
    results = run_distributed(train_case, 2, "fssdp", {"overlap_degree": 2, "fit_replicas": False}, 5,
                              capacity_factor=1.0)
    check_training(results)


@pytest.mark.parametrize("prefetch", [True, False])
def test_fssdp_prefetch_on_and_off(prefetch):
    """Layer l+1's spAG issued at the end of layer l (P1 from predicted load) changes nothing."""
    results = run_distributed(train_case, 3, "fssdp", {"overlap_degree": 2, "prefetch": prefetch,
                                                       "fit_replicas": False}, 5, skew=True)
    check_training(results)
    # 2 MoE layers: the second is prefetched in every step after the first (which has no
    # load history to predict from), or never.
    assert results[0]["timings"].get("prefetched_layers", 0) == (4 if prefetch else 0)
    # Backward: layer 1's backward starts layer 0's re-gather early when prefetching.
    assert ("exposed_regather_s" in results[0]["timings"]) == prefetch


def test_fssdp_default_options_train_like_single_process():
    """Defaults: no replica saves bytes at this batch size (fit_replicas), so the layers take
    the P1 == P0 path (no spAG / spRS at all)."""
    results = run_distributed(train_case, 2, "fssdp", {}, 5)
    check_training(results)


def test_fssdp_compute_balanced_routes_train_like_single_process():
    """balance_compute moves tokens between replicas (the math must not notice)."""
    results = run_distributed(train_case, 3, "fssdp", {"overlap_degree": 2, "fit_replicas": False,
                                                       "balance_compute": True}, 5, skew=True)
    check_training(results)
    assert results[0]["timings"].get("balanced_rows", 0) > 0, "skewed routing should have needed balancing"
