"""Topology: node layout, node groups, EP / EDP groups, validation; CommStats; check_agreement."""
import pytest
import torch
import torch.distributed as dist

from hecate.comm import AgreementError, CommStats, Topology, check_agreement, digest
from hecate.testing import run_distributed


def test_layout_without_process_group():
    topo = Topology(rank=5, world_size=8, ranks_per_node=4)
    assert (topo.num_nodes, topo.node, topo.local_rank) == (2, 1, 1)
    assert topo.node_ranks() == [4, 5, 6, 7] and topo.node_ranks(0) == [0, 1, 2, 3]
    assert topo.same_node(0, 3) and not topo.same_node(3, 4)
    groups = topo.expert_groups(2)
    assert groups.ep_ranks == (4, 5) and groups.edp_ranks == (1, 3, 5, 7)
    assert (groups.ep_rank, groups.edp_rank) == (1, 2)
    assert topo.expert_groups(2) is groups  # cached: groups are created once


def test_ranks_per_node_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Topology(rank=0, world_size=6).num_nodes == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert Topology(rank=0, world_size=6).num_nodes == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0, world_size=6, ranks_per_node=4), "ranks_per_node=4 must divide world_size=6"),
    (dict(rank=6, world_size=6), "rank=6 must be in"),
    (dict(rank=0, world_size=4, create_groups=True), "create_groups=True needs"),
    (dict(), "rank and world_size are required"),
])
def test_bad_topology(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_bad_ep_size():
    topo = Topology(rank=0, world_size=6)
    for bad in (4, 0, 7):
        with pytest.raises(ValueError, match=f"ep_size={bad} must be a positive divisor of world_size=6"):
            topo.expert_groups(bad)


def _groups_task(rank, world_size):
    topo = Topology(ranks_per_node=2)  # two fake nodes of two ranks on one machine
    groups = topo.expert_groups(2)
    sums = []
    for group in (topo.node_group, groups.ep_group, groups.edp_group):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        sums.append(t.item())
    world = topo.expert_groups(4)  # ep_size == W: the EP group is the world
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=world.ep_group)
    return topo.node, sums, t.item(), world.edp_ranks


def test_groups_reduce_over_the_right_ranks():
    results = run_distributed(_groups_task, 4)
    # nodes {0,1} {2,3}; ep groups {0,1} {2,3}; edp groups {0,2} {1,3}
    assert [r[0] for r in results] == [0, 0, 1, 1]
    assert [r[1] for r in results] == [[1, 1, 2], [1, 1, 4], [5, 5, 2], [5, 5, 4]]
    assert [r[2] for r in results] == [6.0] * 4
    assert [r[3] for r in results] == [(0,), (1,), (2,), (3,)]


def test_comm_stats_counters():
    stats = CommStats()
    stats.record("spAG", 100, 40)
    stats.record("spAG", 1, 2)
    stats.record("a2a", 0, 8)
    assert stats.sent("spAG") == 101 and stats.received("spAG") == 42 and stats.calls("spAG") == 2
    assert stats.total_bytes() == 101 + 42 + 8
    snap = stats.reset()
    assert snap == {"a2a": {"sent": 0, "received": 8, "calls": 1},
                    "spAG": {"sent": 101, "received": 42, "calls": 2}}
    assert stats.total_bytes() == 0 and stats.snapshot() == {}
    assert CommStats.combine([snap, snap])["spAG"] == {"sent": 202, "received": 84, "calls": 4}
    with pytest.raises(ValueError, match="byte counts must be >= 0"):
        stats.record("x", -1, 0)


def test_digest_sees_dtype_shape_and_values():
    a = torch.arange(6)
    assert digest(a) == digest(torch.arange(6))
    assert len({digest(a), digest(a.view(2, 3)), digest(a.int()), digest(a + 1)}) == 4
    assert digest([a, 3, "x"]) != digest([a, 4, "x"])
    with pytest.raises(TypeError, match="cannot hash a object"):
        digest(object())


def _agreement_task(rank, world_size, odd_ranks):
    value = torch.tensor([1, 2, 3 + (rank in odd_ranks)])
    try:
        check_agreement("layer7.plan", value)
        return "agreed"
    except AgreementError as exc:
        return exc.minority_ranks, exc.majority_ranks, str(exc)


def test_agreement():
    assert run_distributed(_agreement_task, 3, []) == ["agreed"] * 3
    results = run_distributed(_agreement_task, 4, [1, 3])  # tie: the lowest rank's value wins
    assert {tuple(map(tuple, r[:2])) for r in results} == {((1, 3), (0, 2))}
    assert "'layer7.plan': ranks [1, 3] differ from ranks [0, 2]" in results[0][2]
