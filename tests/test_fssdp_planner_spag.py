"""The per-step spAG / spRS plan (hecate.comm.sparse.plan_sparse) and the host destination bins,
which read only one rank's part of the placement, against the whole-placement formulations:
the planning kernel (hecate.ops.plan_sparse_collective, and its Python reference) with the
row maps derived as before, and the dense reference bins (tests/fssdp_reference_planner.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate import ops
from hecate.comm.sparse import plan_sparse
from hecate.ops import reference as ops_reference
from hecate.parallel.fssdp import route_tokens
from hecate.parallel.fssdp.strategy import FullyShardedSparse
from tests import fssdp_reference_planner as ref


def _whole_placement_plan(owner_C, holders_WC, rank, kernel):
    """Every field of SparsePlan computed from the whole [W, C] placement (the former way)."""
    send_ids, send_counts, recv_ids, recv_counts = kernel(owner_C, holders_WC, rank)
    owned_mask, held_mask = owner_C == rank, holders_WC[rank]
    owned_row_C = torch.cumsum(owned_mask.to(torch.int64), 0) - 1
    held_row_C = torch.cumsum(held_mask.to(torch.int64), 0) - 1
    owned_ids = owned_mask.nonzero().view(-1)
    return dict(send_counts=send_counts.tolist(), recv_counts=recv_counts.tolist(), send_ids=send_ids,
                recv_ids=recv_ids, owned_ids=owned_ids, held_ids=held_mask.nonzero().view(-1),
                send_rows=owned_row_C[send_ids], recv_rows=held_row_C[recv_ids],
                owned_rows_M=held_row_C[owned_ids])


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 9), st.integers(0, 20), st.sampled_from([0.0, 0.2, 0.6, 1.0]),
       st.integers(0, 2**32 - 1), st.booleans())
def test_plan_sparse_equals_the_whole_placement_plan(W, C, density, seed, int32_owner):
    rng = np.random.default_rng(seed)
    owner = torch.from_numpy(rng.integers(0, W, C))
    holders = torch.from_numpy(rng.random((W, C)) < density)
    holders[owner, torch.arange(C)] = True
    if int32_owner:
        owner = owner.to(torch.int32)
    for rank in range(W):
        got = plan_sparse(owner, holders, rank)
        assert (got.rank, got.world_size, got.num_chunks) == (rank, W, C)
        for kernel in (ops.plan_sparse_collective, ops_reference.plan_sparse_collective):
            want = _whole_placement_plan(owner.to(torch.int64), holders, rank, kernel)
            for name, value in want.items():
                field = getattr(got, name)
                if isinstance(value, list):
                    assert field == value and all(type(v) is int for v in field), name
                else:
                    assert field.dtype == torch.int64 and torch.equal(field, value), name


@pytest.mark.parametrize("owner,rank,match", [
    ([0, 3], 0, r"owner_C\[1\] = 3 is out of range \[0, 2\)"),
    ([-1, 0], 0, r"owner_C\[0\] = -1 is out of range"),
    ([0, 1], 0, r"owner 1 of chunk 1 is not among its holders .* P0 must be a subset of P1"),
    ([0, 0], 2, r"rank must be an int in \[0, 2\), got 2"),
])
def test_plan_sparse_names_bad_input(owner, rank, match):
    holders = torch.tensor([[True, True], [False, False]])
    with pytest.raises(ValueError, match=match):
        plan_sparse(torch.tensor(owner), holders, rank)


@pytest.mark.parametrize("E", [5, 300])  # uint8 keys (<= 256 split experts) and int32 keys
def test_host_bins_with_many_split_experts_equal_the_reference(E):
    """Rank 0 holds nothing but its owned expert 0; ranks 1 and 2 (its node) hold every expert,
    so every other expert's entries are split over two destinations. Entries below -1 are
    dropped like -1."""
    W = 3
    holders = np.ones((W, E), dtype=np.bool_)
    holders[0, 1:] = False
    g = torch.Generator().manual_seed(E)
    indices = torch.randint(-3, E, (700, 2), generator=g)
    counts = np.zeros((W, E), dtype=np.int64)
    counts[0] = torch.bincount(indices[indices >= 0], minlength=E).numpy()
    counts[1:] = 5
    routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.zeros(W, dtype=torch.int64))
    layout = routes.layout(0)
    assert (np.bincount(layout.send_e, minlength=E)[1:] == 2).sum() > 1  # really split
    want = ref.destination_bins(indices, torch.from_numpy(counts[0]), torch.from_numpy(layout.send_WE()))
    for compact in (True, False):
        got = FullyShardedSparse._destination_bins(indices, E, layout, compact=compact)
        assert torch.equal(got, want)


def test_host_bins_refuse_split_entries_that_disagree_with_the_plan():
    """The totals agree but the split expert's entries do not: the bins say so."""
    holders = np.array([[True, False], [True, True], [True, True]])
    counts = np.array([[1, 3], [0, 0], [0, 0]])
    routes = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="splits over several ranks"):
        FullyShardedSparse._destination_bins(torch.tensor([[0, 0], [0, 1]]), 2, routes.layout(0))
