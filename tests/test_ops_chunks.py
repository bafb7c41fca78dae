"""pack / unpack / scatter_add of chunks and plan_sparse_collective: kernels against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hecate.ops as ops
from hecate.ops import reference as ref

SETTINGS = settings(max_examples=40, deadline=None)


def kernel(name):
    """The compiled op; fails (never skips) when hecate._C is not built, since CI builds it."""
    assert ops.extension_available(), "hecate._C is not built: run `make build`"
    return getattr(torch.ops.hecate, name)


def random_rows(n, S, dtype, gen):
    if dtype == torch.int64:
        return torch.randint(-100, 100, (n, S), generator=gen)
    return torch.randn(n, S, generator=gen).to(dtype)


@st.composite
def chunk_case(draw, unique_ids):
    C = draw(st.integers(1, 9))
    S = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if unique_ids:
        n = draw(st.integers(0, C))
        ids = torch.randperm(C, generator=gen)[:n]
    else:
        n = draw(st.integers(0, 2 * C))
        ids = torch.randint(0, C, (n,), generator=gen)
    return random_rows(C, S, dtype, gen), ids, random_rows(n, S, dtype, gen)


@SETTINGS
@given(chunk_case(unique_ids=False))
def test_pack_matches_reference(case):
    buffer, ids, _ = case
    packed = kernel("pack_chunks")(buffer, ids)
    assert packed.is_contiguous() and torch.equal(packed, ref.pack_chunks(buffer, ids))


@SETTINGS
@given(chunk_case(unique_ids=True))
def test_unpack_matches_reference(case):
    out, ids, recv = case
    expected = out.clone()
    ref.unpack_chunks(recv, ids, expected)
    kernel("unpack_chunks")(recv, ids, out)
    assert torch.equal(out, expected)


@SETTINGS
@given(chunk_case(unique_ids=False))
def test_scatter_add_matches_reference_in_order(case):
    out, ids, recv = case
    expected = out.clone()
    ref.scatter_add_chunks(recv, ids, expected)
    kernel("scatter_add_chunks")(recv, ids, out)
    assert torch.equal(out, expected)  # same order of additions: bitwise equal, bf16 included


def test_large_rows_split_into_segments():
    gen = torch.Generator().manual_seed(0)
    buffer = torch.randn(5, 70001, generator=gen)  # 280 KB rows: more than one parallel segment
    ids = torch.tensor([3, 0, 3, 1])
    packed = ops.pack_chunks(buffer, ids)
    assert torch.equal(packed, buffer[ids])
    out = torch.zeros_like(buffer)
    ops.unpack_chunks(packed[1:], ids[1:], out)
    assert torch.equal(out[[0, 1, 3]], buffer[[0, 1, 3]]) and bool((out[[2, 4]] == 0).all())
    total = torch.zeros_like(buffer)
    ops.scatter_add_chunks(packed, ids, total)
    assert torch.equal(total[3], buffer[3] + buffer[3]) and torch.equal(total[0], buffer[0])


def test_unpack_repeated_ids_last_wins():
    out = torch.zeros(2, 3)
    kernel("unpack_chunks")(torch.tensor([[1.0] * 3, [2.0] * 3]), torch.tensor([1, 1]), out)
    assert out.tolist() == [[0.0] * 3, [2.0] * 3]


# ---------------------------------------------------------------- plan


@st.composite
def placements(draw):
    W = draw(st.integers(1, 5))
    C = draw(st.integers(0, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    owner = torch.randint(0, W, (C,), generator=gen)
    holders = torch.rand(W, C, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    holders[owner, torch.arange(C)] = True  # P0 is a subset of P1
    return owner, holders


@SETTINGS
@given(placements())
def test_plan_matches_reference_and_is_consistent_across_ranks(placement):
    owner, holders = placement
    W = holders.shape[0]
    plans = [kernel("plan_sparse_collective")(owner, holders, r) for r in range(W)]
    for r, plan in enumerate(plans):
        for got, want in zip(plan, ref.plan_sparse_collective(owner, holders, r)):
            assert got.dtype == torch.int64 and torch.equal(got, want)
    # What rank s sends to rank d is exactly what d receives from s, in the same order.
    for s in range(W):
        send_ids, send_counts = plans[s][0].tolist(), plans[s][1].tolist()
        for d in range(W):
            recv_ids, recv_counts = plans[d][2].tolist(), plans[d][3].tolist()
            sent = send_ids[sum(send_counts[:d]):sum(send_counts[:d + 1])]
            received = recv_ids[sum(recv_counts[:s]):sum(recv_counts[:s + 1])]
            assert sent == received
            assert sent == sorted(sent)


def test_plan_example():
    owner = torch.tensor([0, 1, 2, 0])
    holders = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    send_ids, send_counts, recv_ids, recv_counts = ops.plan_sparse_collective(owner, holders, 0)
    assert send_ids.tolist() == [0, 3] and send_counts.tolist() == [0, 1, 1]
    assert recv_ids.tolist() == [1] and recv_counts.tolist() == [0, 1, 0]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("owner, match", [
    ([0, 3], "owner_C\\[1\\] = 3 is out of range"),
    ([-1, 0], "owner_C\\[0\\] = -1 is out of range .* needs one owner"),
    ([0, 1], "owner 1 of chunk 1 is not among its holders"),
])
def test_plan_rejects_bad_owners(impl, owner, match):
    holders = torch.tensor([[True, True], [False, False]])
    fn = kernel("plan_sparse_collective") if impl == "kernel" else ref.plan_sparse_collective
    with pytest.raises(ValueError, match=match):
        fn(torch.tensor(owner), holders, 0)


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool), 0), "owner_C must have 1"),
    ((torch.tensor([0]), torch.ones(1, 1), 0), "holders_WC must be a bool"),
    ((torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool), 0), "owner_C must be int64"),
    ((torch.tensor([0, 0]), torch.ones(1, 1, dtype=torch.bool), 0), "owner_C must have shape"),
    ((torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool), 1), "rank must be <= 0"),
    ((torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool, device="meta"), 0), "holders_WC is on meta"),
])
def test_plan_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.plan_sparse_collective(*args)


BUFFER = torch.randn(4, 3)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4), torch.tensor([0])), "buffer_CS must have 2"),
    ((BUFFER, torch.tensor([[0]])), "chunk_ids_n must have 1"),
    ((BUFFER, torch.tensor([0], dtype=torch.int32)), "chunk_ids_n must be int64"),
    ((BUFFER, torch.tensor([4])), "chunk_ids_n contains 4, out of range"),
    ((BUFFER, torch.tensor([-1])), "chunk_ids_n contains -1"),
    ((BUFFER, torch.tensor([0], device="meta")), "chunk_ids_n is on meta"),
])
def test_pack_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.pack_chunks(*args)


@pytest.mark.parametrize("fn", [ops.unpack_chunks, ops.scatter_add_chunks])
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 3), torch.tensor([0, 1]), torch.zeros(4)), "out_CS must have 2"),
    ((torch.randn(2, 2), torch.tensor([0, 1]), torch.zeros(4, 3)), "recv_nS must have shape"),
    ((torch.randn(1, 3), torch.tensor([0, 1]), torch.zeros(4, 3)), "recv_nS must have shape"),
    ((torch.randn(2, 3).double(), torch.tensor([0, 1]), torch.zeros(4, 3)), "dtype"),
    ((torch.randn(2, 3), torch.tensor([0, 9]), torch.zeros(4, 3)), "out of range"),
    ((torch.randn(2, 3), torch.tensor([0, 1]), torch.zeros(3, 4).t()), "contiguous"),
    ((torch.randn(2, 3, device="meta"), torch.tensor([0, 1]), torch.zeros(4, 3)), "recv_nS is on meta"),
])
def test_unpack_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_kernels_reject_bad_ids_with_value_error():
    with pytest.raises(ValueError, match="out of range"):
        kernel("pack_chunks")(BUFFER, torch.tensor([7]))
    with pytest.raises(ValueError, match="out of range"):
        kernel("scatter_add_chunks")(torch.randn(1, 3), torch.tensor([-2]), torch.zeros(4, 3))
