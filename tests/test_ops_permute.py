"""expert_histogram, permute, unpermute and unpermute_backward: kernels against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hecate.ops as ops
from hecate.ops import reference as ref

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def kernel(name):
    """The compiled op; fails (never skips) when hecate._C is not built, since CI builds it."""
    assert ops.extension_available(), "hecate._C is not built: run `make build`"
    return getattr(torch.ops.hecate, name)


def tolerance(dtype):
    return {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}


@st.composite
def routed_tokens(draw):
    """x_TD, bins_TK (with unrouted -1 entries, empty bins, all-to-one), num_bins, capacity, priority."""
    T = draw(st.integers(0, 30))
    K = draw(st.integers(1, 4))
    B = draw(st.integers(1, 7))
    D = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["random", "one_bin", "with_unrouted"]))
    if layout == "one_bin":
        bins = torch.full((T, K), draw(st.integers(0, B - 1)), dtype=torch.int64)
    else:
        bins = torch.randint(-1 if layout == "with_unrouted" else 0, B, (T, K), generator=gen)
    capacity = draw(st.sampled_from([-1, 0, 1, 2, 5, 100]))
    priority = None
    if draw(st.booleans()):  # few distinct values: ties resolved by token, then k
        priority = torch.randint(0, 3, (T, K), generator=gen).to(torch.float32)
    x = torch.randn(T, D, generator=gen).to(dtype)
    return x, bins, B, capacity, priority


@SETTINGS
@given(routed_tokens())
def test_permute_matches_reference(case):
    x, bins, B, capacity, priority = case
    x_ND, row_map, counts = kernel("permute")(x, bins, B, capacity, priority)
    x_ref, row_map_ref, counts_ref = ref.permute(x, bins, B, capacity, priority)
    assert torch.equal(row_map, row_map_ref)
    assert torch.equal(counts, counts_ref)
    assert x_ND.dtype == x.dtype and torch.equal(x_ND, x_ref)
    # Independent of the reference: every kept row holds its token, bins respect the capacity.
    assert int(counts.sum()) == x_ND.shape[0]
    if capacity >= 0:
        assert all(c <= capacity for c in counts.tolist())
    kept = row_map >= 0
    assert bool((bins[kept] >= 0).all())
    tokens = torch.arange(x.shape[0]).unsqueeze(1).expand_as(row_map)
    assert torch.equal(x_ND[row_map[kept]], x[tokens[kept]])


@SETTINGS
@given(routed_tokens(), st.booleans())
def test_unpermute_and_backward_match_reference(case, with_weights):
    x, bins, B, capacity, _ = case
    x_ND, row_map, _ = ref.permute(x, bins, B, capacity, None)
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(row_map.shape, generator=gen) if with_weights else None
    out = kernel("unpermute")(x_ND, row_map, weights)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref.unpermute(x_ND, row_map, weights), **tolerance(x.dtype))
    grad = torch.randn(x.shape, generator=gen).to(x.dtype)
    grad_y, grad_w = kernel("unpermute_backward")(grad, x_ND, row_map, weights, True)
    grad_y_ref, grad_w_ref = ref.unpermute_backward(grad, x_ND, row_map, weights)
    torch.testing.assert_close(grad_y, grad_y_ref, **tolerance(x.dtype))
    if with_weights:
        torch.testing.assert_close(grad_w, grad_w_ref, **tolerance(x.dtype))
    else:
        assert grad_w is None


def test_capacity_by_position_is_gshard_order():
    # Bin 1 gets four requests: first choices of tokens 1, 2 beat second choices of tokens 0, 3.
    bins = torch.tensor([[0, 1], [1, 0], [1, 2], [0, 1], [-1, 1]])
    x = torch.arange(5.0).unsqueeze(1)
    for impl in (kernel("permute"), ref.permute):
        x_ND, row_map, counts = impl(x, bins, 3, 2, None)
        assert row_map.tolist() == [[0, -1], [2, -1], [3, 4], [1, -1], [-1, -1]]
        assert counts.tolist() == [2, 2, 1]
        assert x_ND.squeeze(1).tolist() == [0.0, 3.0, 1.0, 2.0, 2.0]


def test_capacity_by_priority_keeps_highest_then_lower_token():
    bins = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    priority = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.5, 0.2], [0.9, 0.4]])
    for impl in (kernel("permute"), ref.permute):
        _, row_map, counts = impl(torch.zeros(4, 1), bins, 2, 2, priority)
        # bin 0: 0.5 (t1) and 0.5 (t2) tie -> both beat 0.4 (t3) and 0.1 (t0)
        # bin 1: 0.9 (t0) and 0.9 (t3) kept, 0.5 (t1) dropped
        assert row_map.tolist() == [[-1, 2], [0, -1], [1, -1], [3, -1]]
        assert counts.tolist() == [2, 2]


def test_rows_ordered_by_bin_then_token_then_k():
    bins = torch.tensor([[2, 2], [0, 2], [2, 0]])
    _, row_map, counts = kernel("permute")(torch.zeros(3, 1), bins, 3, -1, None)
    assert row_map.tolist() == [[2, 3], [0, 4], [5, 1]]
    assert counts.tolist() == [2, 0, 4]


def test_zero_tokens_and_all_dropped():
    x_ND, row_map, counts = kernel("permute")(torch.empty(0, 4), torch.empty(0, 2, dtype=torch.int64),
                                              3, -1, None)
    assert x_ND.shape == (0, 4) and row_map.shape == (0, 2) and counts.tolist() == [0, 0, 0]
    x = torch.randn(3, 4)
    x_ND, row_map, counts = kernel("permute")(x, torch.zeros(3, 1, dtype=torch.int64), 2, 0, None)
    assert x_ND.shape == (0, 4) and bool((row_map == -1).all())
    out = kernel("unpermute")(x_ND, row_map, None)
    assert torch.equal(out, torch.zeros(3, 4))
    assert torch.equal(ref.unpermute(x_ND, row_map, None), torch.zeros(3, 4))


@SETTINGS
@given(st.integers(0, 40), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_histogram_matches_reference(T, K, B, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, B, (T, K), generator=gen)
    counts = kernel("expert_histogram")(indices, B)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, ref.expert_histogram(indices, B))
    assert int(counts.sum()) == int((indices >= 0).sum())


def test_histogram_large_input_spans_tasks():
    indices = torch.randint(-1, 64, (70000, 2))
    assert torch.equal(kernel("expert_histogram")(indices, 64), ref.expert_histogram(indices, 64))


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("capacity", [-1, 2])
def test_gradcheck_float64_permute_unpermute(capacity):
    kernel("permute")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(7, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    bins = torch.randint(-1, 3, (7, 2), generator=gen)
    scale = torch.randn(1, 3, dtype=torch.float64, generator=gen)

    def fn(x_TD, weights_TK):
        x_ND, row_map, _ = ops.permute(x_TD, bins, 3, capacity)
        return ops.unpermute(torch.tanh(x_ND * scale), row_map, weights_TK)  # a nonlinear "expert"

    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_weights", [True, False])
def test_gradients_match_reference(dtype, use_weights):
    kernel("permute")
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(40, 8, generator=gen).to(dtype)
    w0 = torch.rand(40, 2, generator=gen)
    bins = torch.randint(-1, 5, (40, 2), generator=gen)
    grad = torch.randn(40, 8, generator=gen).to(dtype)
    results = []
    for impl in (ops, ref):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_() if use_weights else None
        x_ND, row_map, _ = impl.permute(x, bins, 5, 6)
        out = impl.unpermute(x_ND * 2, row_map, w)
        out.backward(grad)
        results.append((out, x.grad, w.grad if use_weights else None))
    (out, gx, gw), (out_ref, gx_ref, gw_ref) = results
    torch.testing.assert_close(out, out_ref, **tolerance(dtype))
    torch.testing.assert_close(gx, gx_ref, **tolerance(dtype))
    if use_weights:
        torch.testing.assert_close(gw, gw_ref, **tolerance(dtype))


@pytest.mark.parametrize("weights_need_grad", [False, True])
def test_unpermute_weights_gradient_skipped_when_not_needed(monkeypatch, weights_need_grad):
    """The backward kernel is asked for the weights' gradient only when the weights need one."""
    import hecate.ops._autograd as autograd

    backward_kernel = kernel("unpermute_backward")
    asked = []

    def spy(name):
        if name != "unpermute_backward":
            return autograd_op(name)

        def call(*args):
            asked.append(args[4])
            return backward_kernel(*args)
        return call

    autograd_op = autograd.op
    monkeypatch.setattr(autograd, "op", spy)
    y = torch.randn(4, 3, requires_grad=True)
    w = torch.rand(2, 2, requires_grad=weights_need_grad)
    row_map = torch.tensor([[0, 1], [2, 3]])
    ops.unpermute(y, row_map, w).sum().backward()
    assert asked == [weights_need_grad]
    assert y.grad is not None and (w.grad is not None) == weights_need_grad
    if weights_need_grad:  # d/dw_tk sum(unpermute) = sum of row row_map[t, k] of y
        torch.testing.assert_close(w.grad, y.detach()[row_map].sum(-1))


def test_face_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(ops, "use_extension", lambda *args: False)
    x = torch.randn(6, 3, requires_grad=True)
    bins = torch.tensor([[0, 1]] * 6)
    x_ND, row_map, counts = ops.permute(x, bins, 2, 4)
    ops.unpermute(x_ND, row_map).sum().backward()
    assert counts.tolist() == [4, 4] and x.grad is not None
    with pytest.raises(ValueError, match="num_bins"):
        ops.permute(x, bins, 1)


# ---------------------------------------------------------------- bad input


X = torch.randn(4, 3)
BINS = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1]])


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4), BINS, 2), "x_TD must have 2"),
    ((X, BINS[:, 0], 2), "bins_TK must have 2"),
    ((X, BINS.int(), 2), "bins_TK must be int64"),
    ((X, BINS[:3], 2), "bins_TK has 3 rows"),
    ((X, BINS, 0), "num_bins must be >= 1"),
    ((X, BINS, 1), "bins_TK contains 1, out of range for num_bins"),
    ((X, BINS, 2, 1, torch.rand(4, 3)), "priority_TK must have shape"),
    ((X, BINS, 2, 1, torch.randint(0, 2, (4, 2))), "priority_TK must be a floating"),
    ((X, BINS.to("meta"), 2), "bins_TK is on meta"),
])
def test_permute_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.permute(*args)


ROW_MAP = torch.tensor([[0, 1], [2, -1]])


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3), ROW_MAP), "y_ND must have 2"),
    ((torch.randint(0, 2, (3, 2)), ROW_MAP), "y_ND must be a floating"),
    ((torch.randn(3, 2), ROW_MAP.float()), "row_map_TK must be int64"),
    ((torch.randn(3, 2), ROW_MAP[0]), "row_map_TK must have 2"),
    ((torch.randn(2, 2), ROW_MAP), "row_map_TK contains 2, out of range"),
    ((torch.randn(3, 2), ROW_MAP, torch.rand(2, 3)), "weights_TK must have shape"),
    ((torch.randn(3, 2), ROW_MAP, torch.rand(2, 2, device="meta")), "weights_TK is on meta"),
])
def test_unpermute_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.unpermute(*args)


def test_unpermute_backward_bad_input():
    y = torch.randn(3, 2)
    with pytest.raises(ValueError, match="grad_TD must have shape"):
        ops.unpermute_backward(torch.randn(3, 2), y, ROW_MAP)
    with pytest.raises(ValueError, match="more than once"):
        ops.unpermute_backward(torch.randn(2, 2), y, torch.tensor([[0, 0], [1, 2]]))


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([0, 1]), 2), "indices_TK must have 2"),
    ((torch.tensor([[0, 1]], dtype=torch.int32), 2), "indices_TK must be int64"),
    ((torch.tensor([[0, 2]]), 2), "indices_TK contains 2"),
    ((torch.tensor([[0, 1]]), 0), "num_bins must be >= 1"),
])
def test_histogram_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.expert_histogram(*args)


def test_kernels_reject_out_of_range_with_value_error():
    with pytest.raises(ValueError, match="out of range"):
        kernel("expert_histogram")(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match="out of range"):
        kernel("permute")(X, BINS, 1, -1, None)
    with pytest.raises(ValueError, match="out of range"):
        kernel("unpermute")(torch.randn(2, 2), ROW_MAP, None)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 10, generator=gen).t()  # (10, 6), strided
    bins = torch.randint(0, 3, (2, 10), generator=gen).t()
    weights = torch.rand(2, 10, generator=gen).t()
    x_ND, row_map, counts = ops.permute(x, bins, 3, 4)
    for got, want in zip((x_ND, row_map, counts), ref.permute(x, bins, 3, 4)):
        assert torch.equal(got, want)
    y_ND = torch.randn(6, x_ND.shape[0], generator=gen).t()
    torch.testing.assert_close(ops.unpermute(y_ND, row_map, weights), ref.unpermute(y_ND, row_map, weights))


def test_index_range_check_does_not_read_back_off_cpu(monkeypatch):
    """Off the CPU the range check is queued on the device: reading a value back (int() of a
    meta tensor raises) would stall the stream on every call. HECATE_SYNC_CHECKS=1 reads back."""
    from hecate.ops import _validate as check

    queued = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg: queued.append(msg))
    meta = torch.empty(6, dtype=torch.int64, device="meta")
    check.below("bins_TK", meta, 4, "num_bins", allow_negative=True)
    assert queued == ["bins_TK has an entry outside bins_TK < num_bins = 4"]
    monkeypatch.setenv("HECATE_SYNC_CHECKS", "1")
    with pytest.raises(Exception):
        check.below("bins_TK", meta, 4, "num_bins", allow_negative=True)
    with pytest.raises(ValueError, match="bins_TK contains 7, out of range for num_bins = 4"):
        check.below("bins_TK", torch.tensor([0, 7]), 4, "num_bins", allow_negative=True)


# ---- host-known row count: the accelerator path reads nothing back ---------------------------
@pytest.mark.parametrize("T,K,B,seed", [(0, 2, 3, 0), (7, 1, 4, 1), (13, 2, 5, 2), (32, 3, 7, 3)])
def test_permute_known_rows_matches_permute(T, K, B, seed):
    from hecate.ops import permute_known_rows

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 6, generator=g, dtype=torch.float64)
    bins = torch.randint(-1, B, (T, K), generator=g)  # -1: unrouted entries
    n = int((bins >= 0).sum())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = ops.permute(xa, bins, B, num_rows=n)
    got = permute_known_rows(xb, bins, B, n)
    for a, b in zip(got, want):
        assert torch.equal(a.detach(), b.detach())
    gy = torch.randn(n, 6, generator=g, dtype=torch.float64)
    if n:
        (got[0] * gy).sum().backward()
        (want[0] * gy).sum().backward()
        assert torch.equal(xb.grad, xa.grad)


def test_permute_num_rows_must_be_exact_and_dropless():
    x, bins = torch.randn(4, 2), torch.tensor([[0], [1], [-1], [1]])
    with pytest.raises(ValueError, match="num_rows = 4"):
        ops.permute(x, bins, 2, num_rows=4)
    with pytest.raises(ValueError, match="dropless"):
        ops.permute(x, bins, 2, capacity=1, num_rows=3)
    from hecate.ops import permute_known_rows

    with pytest.raises(RuntimeError, match="num_rows"):  # queued check (immediate on the CPU)
        permute_known_rows(x, bins, 2, 2)
