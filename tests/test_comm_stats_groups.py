"""CommStats.record's inter-node share is kept per group: the same bytes as walking the
group's members each call, for any group and layout, and a new layout is not served stale."""
import random

import pytest

from hecate.comm.stats import CommStats


def _walked(node_of, rank, ranks, sent):
    peers = [r for r in (range(len(node_of)) if ranks is None else ranks) if r != rank]
    inter = sum(node_of[p] != node_of[rank] for p in peers)
    return sent * inter // len(peers) if peers else 0


def _random_stats(rng):
    """(W, node_of, rank, CommStats on that layout) of up to 12 ranks on up to 4 nodes."""
    W = rng.randint(1, 12)
    node_of = [rng.randint(0, 3) for _ in range(W)]
    rank = rng.randrange(W)
    s = CommStats()
    s.set_layout(rank, node_of)
    return W, node_of, rank, s


def test_record_inter_share_matches_the_walk_for_random_groups():
    rng = random.Random(0)
    for _ in range(200):
        W, node_of, rank, s = _random_stats(rng)
        want = 0
        for call in range(4):
            ranks = None if rng.random() < 0.3 else sorted(rng.sample(range(W), rng.randint(1, W)))
            sent = rng.randint(0, 10_000)
            s.record("x", sent, sent, ranks=ranks)
            s.record("x", sent, sent, ranks=None if ranks is None else tuple(ranks))  # same group, cached
            want += 2 * _walked(node_of, rank, ranks, sent)
        assert s.sent_inter("x") == s.received_inter("x") == want


def test_a_new_layout_recomputes_the_share():
    s = CommStats()
    s.set_layout(0, [0, 0, 1, 1])
    s.record("x", 300, 300, ranks=[0, 1, 2, 3])  # peers 1 (same node), 2, 3 (other node)
    assert s.sent_inter("x") == 200
    s.set_layout(0, [0, 0, 0, 0])  # one node now: nothing crosses
    s.record("y", 300, 300, ranks=[0, 1, 2, 3])
    assert s.sent_inter("y") == 0


def test_record_peers_matches_the_per_member_walk():
    rng = random.Random(1)
    for _ in range(200):
        W, node_of, rank, s = _random_stats(rng)
        group = sorted(rng.sample(range(W), rng.randint(1, W)))
        if rank not in group:
            group = sorted(group + [rank])
        ranks = None if rng.random() < 0.3 else group
        members = list(range(W)) if ranks is None else ranks
        group_rank = members.index(rank)
        want = [0, 0, 0, 0]
        for call in range(3):
            sent = [rng.randint(0, 1000) for _ in members]
            received = [rng.randint(0, 1000) for _ in members]
            s.record_peers("a2a", sent, received, group_rank, ranks)
            for i, g in enumerate(members):
                if i == group_rank:
                    continue
                want[0] += sent[i]
                want[1] += received[i]
                if node_of[g] != node_of[rank]:
                    want[2] += sent[i]
                    want[3] += received[i]
        assert [s.sent("a2a"), s.received("a2a"), s.sent_inter("a2a"), s.received_inter("a2a")] == want
        assert s.calls("a2a") == 3


def test_record_peers_refuses_negative_bytes_naming_the_member():
    s = CommStats()
    s.set_layout(0, [0, 1, 1])
    with pytest.raises(ValueError, match="member 2"):
        s.record_peers("a2a", [0, 5, -1], [0, 1, 2], 0)
