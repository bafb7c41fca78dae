"""balance_routes: tokens of replicated experts shift within a node until the ranks' expert rows
are even, keeping every token routed once and only to holders."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.parallel.fssdp.routes import balance_routes, token_routes
from hecate.parallel.fssdp.topology import node_of_ranks


def _load(routes):
    return routes.sum(dim=(0, 1))


def test_hot_replicated_expert_is_split_to_even_out_the_owner_of_cold_ones():
    # 2 ranks; expert 0 hot and replicated on both; experts 1, 2 owned by rank 1 only, so
    # local-first routes leave rank 1 with rank 0's tokens of them on top of its own.
    holders = torch.tensor([[True, False, False], [True, True, True]])
    counts = torch.tensor([[1000, 300, 100], [1000, 200, 200]])
    nodes = node_of_ranks(2, 2)
    r = token_routes(holders, counts, nodes)
    assert _load(r).tolist() == [1000, 1800]
    b = balance_routes(r, holders, nodes, tolerance=0.0, min_rows=1)
    assert _load(b).tolist() == [1400, 1400]
    assert torch.equal(b.sum(-1), counts)
    # Rank 1's own tokens of the hot expert moved (the only ones that could), nothing else.
    assert b[1, 0].tolist() == [400, 600] and torch.equal(b[:, 1:], r[:, 1:])


def test_balanced_or_unreplicated_routes_are_left_alone():
    nodes = node_of_ranks(2, 2)
    holders = torch.tensor([[True, False], [False, True]])  # no replica: nothing can move
    counts = torch.tensor([[900, 10], [900, 10]])
    r = token_routes(holders, counts, nodes)
    assert torch.equal(balance_routes(r, holders, nodes), r)
    holders = torch.ones(2, 2, dtype=torch.bool)
    r = token_routes(holders, torch.tensor([[500, 500], [500, 510]]), nodes)
    assert torch.equal(balance_routes(r, holders, nodes), r)  # within 2%


def test_never_shifts_across_nodes():
    nodes = node_of_ranks(4, 2)  # ranks 0,1 | 2,3
    holders = torch.zeros(4, 2, dtype=torch.bool)
    holders[:, 0] = True          # replicated everywhere
    holders[0, 1] = True          # cold expert only on rank 0
    counts = torch.tensor([[100, 0], [100, 0], [100, 0], [100, 900]])
    r = token_routes(holders, counts, nodes)  # rank 3's 900 tokens of expert 1 cross to rank 0
    b = balance_routes(r, holders, nodes, tolerance=0.0, min_rows=1)
    # Rank 0's overload can only go to rank 1 (same node), never to ranks 2, 3, and only its
    # tokens of the shared expert 0 can move: all 100 of them.
    assert _load(b)[2:].tolist() == _load(r)[2:].tolist()
    assert _load(b)[:2].tolist() == [900, 200] and b[0, 0].tolist() == [0, 100, 0, 0]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 2), st.integers(0, 10_000))
def test_properties(W, E, per_node, seed):
    g = torch.Generator().manual_seed(seed)
    holders = torch.rand(W, E, generator=g) < 0.5
    holders[torch.randint(0, W, (E,), generator=g), torch.arange(E)] = True  # an owner each
    counts = torch.randint(0, 50, (W, E), generator=g) * (torch.rand(W, E, generator=g) < 0.8)
    nodes = node_of_ranks(W, per_node if W % per_node == 0 else 1)
    r = token_routes(holders, counts, nodes)
    b = balance_routes(r, holders, nodes, tolerance=0.0, min_rows=1)
    assert torch.equal(b.sum(-1), counts)                      # every token routed once
    assert bool((b >= 0).all())
    assert bool(((b > 0) <= holders.T.unsqueeze(0)).all())     # only to holders of the expert
    assert int(_load(b).max()) <= int(_load(r).max())          # the slowest rank never gets slower
    for n in nodes.unique():                                   # rows stay on their node
        on = nodes == n
        assert int(_load(b)[on].sum()) == int(_load(r)[on].sum())
    assert torch.equal(b, balance_routes(r, holders, nodes, tolerance=0.0, min_rows=1))  # deterministic
