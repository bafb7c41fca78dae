"""CUDA kernels of hecate._C against hecate.ops.reference and against the CPU kernels.

Marked `gpu`: skipped without a CUDA device. The CUDA sources are compile-checked without a
GPU by tools/cuda_check.sh (`make cuda-check`); these tests are the behavioural check.
Integer outputs (indices, row maps, counts, copies) must match exactly; float outputs match
to a tolerance, since the GPU sums in a different order.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.ops import _backend, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
OPS = ["topk_gating", "expert_histogram", "permute", "unpermute", "unpermute_backward",
       "pack_chunks", "unpack_chunks", "scatter_add_chunks"]
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    """A CUDA machine must have the CUDA kernels, unless the build was forced CPU-only."""
    if os.environ.get("HECATE_NO_CUDA") == "1":
        pytest.skip("HECATE_NO_CUDA=1: hecate._C was built without its CUDA kernels")
    missing = [name for name in OPS if not _backend.use_extension(name, CUDA)]
    assert not missing, f"hecate._C has no CUDA kernel for {missing}; rebuild with a CUDA torch"


def hecate_op(name):
    return getattr(torch.ops.hecate, name)


def close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol)


def selection_order(select_TE):
    """Top order by descending value, ties to the lower index (the contract)."""
    return torch.sort(select_TE, dim=-1, descending=True, stable=True).indices


# ---------------------------------------------------------------------------- topk_gating
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (5, 5), (4000, 4)])  # 4000: rows in global memory
def test_topk_gating_matches_reference(dtype, score_func, E, k):
    g = torch.Generator().manual_seed(E * 31 + k)
    logits = torch.randn(97, E, generator=g).to(dtype)
    bias = torch.randn(E, generator=g) * 0.1
    for renormalize, b in [(True, None), (False, bias), (True, bias)]:
        w, idx, s = hecate_op("topk_gating")(logits.to(CUDA), k, score_func, renormalize,
                                             None if b is None else b.to(CUDA))
        w_ref, _, s_ref = reference.topk_gating(logits, k, score_func, renormalize, b)
        math = torch.float64 if dtype == torch.float64 else torch.float32
        assert w.dtype == math and s.dtype == math and idx.dtype == torch.int64
        close(s, s_ref, math)
        # Indices: exactly the contract's order of the kernel's own scores (+ bias), so that
        # last-ulp score differences between devices cannot flip a near-tie.
        select = s.cpu() + (0 if b is None else b.to(math))
        assert torch.equal(idx.cpu(), selection_order(select)[:, :k])
        w_expect = s.cpu().gather(1, idx.cpu())
        if renormalize:
            w_expect = w_expect / w_expect.sum(-1, keepdim=True).clamp_min(1e-20)
        close(w, w_expect, math)
        close(w, w_ref, math)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_gating_ties_go_to_lower_index(score_func):
    # Integer logits with many equal values: equal scores, so only the tie rule decides.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (64, 16), generator=g).float()
    bias = torch.randint(-1, 2, (16,), generator=g).float() * 0.5
    for b in (None, bias):
        w, idx, s = hecate_op("topk_gating")(logits.to(CUDA), 6, score_func, True,
                                             None if b is None else b.to(CUDA))
        _, idx_ref, _ = reference.topk_gating(logits, 6, score_func, True, b)
        assert torch.equal(idx.cpu(), idx_ref)
        _, idx_cpu, _ = hecate_op("topk_gating")(logits, 6, score_func, True, b)
        assert torch.equal(idx.cpu(), idx_cpu)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_gating_nan_rows_keep_valid_indices(score_func):
    # A NaN selection value ranks as -inf: every slot still names a distinct expert in [0, E)
    # (an index of -1 made the backward's gather fault on the device), its weight is NaN.
    logits = torch.randn(6, 8, device=CUDA, requires_grad=True)
    with torch.no_grad():
        logits[1, 3] = float("nan")           # softmax: the whole row is NaN
        logits[2] = float("nan")
        logits[4, :2] = float("inf")          # softmax: inf - inf
    w, idx, s = hecate_op("topk_gating")(logits.detach(), 3, score_func, True, None)
    assert ((idx >= 0) & (idx < 8)).all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct per row
    assert torch.isnan(w[2]).all() and torch.isfinite(w[0]).all()
    from hecate import ops

    w, _, s = ops.topk_gating(logits, 3, score_func)  # autograd: gather / scatter on the indices
    (w.nansum() + s.nansum()).backward()
    torch.cuda.synchronize()
    assert logits.grad.shape == logits.shape


def test_topk_gating_empty_and_errors():
    w, idx, s = hecate_op("topk_gating")(torch.empty(0, 8, device=CUDA), 2, "softmax", True, None)
    assert w.shape == (0, 2) and idx.shape == (0, 2) and s.shape == (0, 8)
    with pytest.raises(ValueError, match="k must be in"):
        hecate_op("topk_gating")(torch.zeros(3, 4, device=CUDA), 5, "softmax", True, None)
    with pytest.raises(ValueError, match="score_func"):
        hecate_op("topk_gating")(torch.zeros(3, 4, device=CUDA), 2, "relu", True, None)
    with pytest.raises(ValueError, match="bias_E must have shape"):
        hecate_op("topk_gating")(torch.zeros(3, 4, device=CUDA), 2, "softmax", True,
                                 torch.zeros(5, device=CUDA))


# ---------------------------------------------------------------------------- expert_histogram
@pytest.mark.parametrize("T,K,B", [(0, 2, 4), (1000, 2, 8), (333, 3, 1), (5000, 1, 20000)])
def test_expert_histogram(T, K, B):
    g = torch.Generator().manual_seed(T + B)
    idx = torch.randint(-1, max(B // 2, 1), (T, K), generator=g)  # upper bins stay empty
    counts = hecate_op("expert_histogram")(idx.to(CUDA), B)
    assert counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), reference.expert_histogram(idx, B))
    assert torch.equal(counts.cpu(), hecate_op("expert_histogram")(idx, B))


# ---------------------------------------------------------------------------- permute
def check_permute(x, bins, B, capacity, priority):
    args_cuda = (x.to(CUDA), bins.to(CUDA), B, capacity, None if priority is None else priority.to(CUDA))
    x_ND, row_map, counts = hecate_op("permute")(*args_cuda)
    x_ref, row_ref, counts_ref = reference.permute(x, bins, B, capacity, priority)
    assert torch.equal(row_map.cpu(), row_ref)
    assert torch.equal(counts.cpu(), counts_ref)
    assert torch.equal(x_ND.cpu(), x_ref)  # a pure copy: bit-exact
    x_cpu, row_cpu, counts_cpu = hecate_op("permute")(x, bins, B, capacity, priority)
    assert torch.equal(row_map.cpu(), row_cpu) and torch.equal(counts.cpu(), counts_cpu)
    assert torch.equal(x_ND.cpu(), x_cpu)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 40), K=st.integers(1, 4), B=st.integers(1, 6), D=st.sampled_from([1, 3, 8, 33]),
       capacity=st.integers(-1, 5), by_priority=st.booleans(), seed=st.integers(0, 2**16))
def test_permute_matches_reference(T, K, B, D, capacity, by_priority, seed):
    g = torch.Generator().manual_seed(seed)
    bins = torch.randint(-1, B, (T, K), generator=g)
    priority = torch.randint(0, 3, (T, K), generator=g).float() if by_priority else None  # ties
    check_permute(torch.randn(T, D, generator=g), bins, B, capacity, priority)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("capacity,by_priority", [(-1, False), (300, False), (300, True)])
def test_permute_large(dtype, capacity, by_priority):
    # Thousands of entries: several radix-sort tiles and histogram blocks.
    g = torch.Generator().manual_seed(11)
    T, K, B, D = 6000, 2, 64, 40
    bins = torch.randint(0, B - 8, (T, K), generator=g)  # the last 8 bins stay empty
    bins[::7, 1] = -1
    priority = torch.rand(T, K, generator=g) if by_priority else None
    check_permute(torch.randn(T, D, generator=g).to(dtype), bins, B, capacity, priority)


def test_permute_rejects_out_of_range_bins():
    with pytest.raises(ValueError, match="out of range for num_bins"):
        hecate_op("permute")(torch.zeros(2, 4, device=CUDA), torch.tensor([[0], [4]], device=CUDA),
                             4, -1, None)


# ---------------------------------------------------------------------------- unpermute
def routed(T, K, B, D, dtype, capacity, seed):
    g = torch.Generator().manual_seed(seed)
    bins = torch.randint(-1, B, (T, K), generator=g)
    x = torch.randn(T, D, generator=g).to(dtype)
    y_ND, row_map, _ = reference.permute(x, bins, B, capacity)
    y_ND = torch.randn(y_ND.shape, generator=g).to(dtype)  # the experts' output
    weights = torch.rand(T, K, generator=g)
    return y_ND, row_map, weights


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,K,D,capacity", [(0, 2, 8, -1), (50, 2, 64, -1), (77, 3, 13, 9), (9, 1, 1, -1)])
def test_unpermute_and_backward(dtype, T, K, D, capacity):
    y_ND, row_map, weights = routed(T, K, 6, D, dtype, capacity, seed=T * K + D)
    if dtype == torch.float64:
        weights = weights.double()
    grad = torch.randn(T, D).to(dtype)
    for w in (weights, None):
        w_cuda = None if w is None else w.to(CUDA)
        out = hecate_op("unpermute")(y_ND.to(CUDA), row_map.to(CUDA), w_cuda)
        assert out.dtype == dtype
        close(out, reference.unpermute(y_ND, row_map, w), dtype)
        close(out, hecate_op("unpermute")(y_ND, row_map, w), dtype)

        grad_y, grad_w = hecate_op("unpermute_backward")(grad.to(CUDA), y_ND.to(CUDA), row_map.to(CUDA),
                                                         w_cuda, True)
        grad_y_ref, grad_w_ref = reference.unpermute_backward(grad, y_ND, row_map, w)
        close(grad_y, grad_y_ref, dtype)
        if w is None:
            assert grad_w is None
        else:
            assert grad_w.dtype == w.dtype
            math = torch.float64 if dtype == torch.float64 else torch.float32
            close(grad_w, grad_w_ref, math)
            _, grad_w_cpu = hecate_op("unpermute_backward")(grad, y_ND, row_map, w, True)
            close(grad_w, grad_w_cpu, math)
    _, none = hecate_op("unpermute_backward")(grad.to(CUDA), y_ND.to(CUDA), row_map.to(CUDA),
                                              weights.to(CUDA), False)
    assert none is None


def test_unpermute_backward_zeroes_unreferenced_rows():
    y_ND = torch.randn(5, 4, device=CUDA)
    row_map = torch.tensor([[3, -1], [0, -1]], device=CUDA)
    grad_y, grad_w = hecate_op("unpermute_backward")(torch.ones(2, 4, device=CUDA), y_ND, row_map,
                                                     torch.full((2, 2), 2.0, device=CUDA), True)
    assert torch.equal(grad_y[[1, 2, 4]].cpu(), torch.zeros(3, 4))
    assert torch.equal(grad_y[[0, 3]].cpu(), torch.full((2, 4), 2.0))
    assert grad_w[0, 1].item() == 0.0 and grad_w[1, 1].item() == 0.0


def test_unpermute_backward_refuses_a_row_referenced_twice(monkeypatch):
    # The kernel writes grad_y's rows in parallel: a row named by two entries kept one entry's
    # gradient (a race, silently wrong) where the CPU op raises. Under HECATE_SYNC_CHECKS=1 the
    # CUDA op reads its device check back and raises the CPU op's ValueError.
    y, grad = torch.randn(3, 4, device=CUDA), torch.ones(2, 4, device=CUDA)
    twice = torch.tensor([[0, 2], [2, -1]], device=CUDA)
    with pytest.raises(ValueError, match="more than once"):
        hecate_op("unpermute_backward")(grad.cpu(), y.cpu(), twice.cpu(), None, False)
    monkeypatch.setenv("HECATE_SYNC_CHECKS", "1")
    with pytest.raises(ValueError, match="more than once"):
        hecate_op("unpermute_backward")(grad, y, twice, None, False)
    grad_y, _ = hecate_op("unpermute_backward")(grad, y, torch.tensor([[0, 2], [1, -1]], device=CUDA),
                                                None, False)
    assert torch.equal(grad_y.cpu(), torch.ones(3, 4))


# Without HECATE_SYNC_CHECKS the check is a queued device assert, which leaves the process's
# CUDA context unusable: it runs in a process of its own.
_REPEAT_ASYNC = """
import torch
from hecate import _extension
_extension.require()
op = torch.ops.hecate.unpermute_backward
y, grad = torch.randn(3, 4, device="cuda"), torch.ones(2, 4, device="cuda")
op(grad, y, torch.tensor([[0, 2], [1, -1]], device="cuda"), None, False)
torch.cuda.synchronize()
print("permutation ok", flush=True)
op(grad, y, torch.tensor([[0, 2], [2, -1]], device="cuda"), None, False)
torch.cuda.synchronize()
print("repeat passed", flush=True)
"""


def test_unpermute_backward_repeated_row_stops_at_the_next_sync():
    env = {k: v for k, v in os.environ.items() if k != "HECATE_SYNC_CHECKS"}
    # 50 s: under gpu_check.sh's 60 s limit per test.
    proc = subprocess.run([sys.executable, "-c", _REPEAT_ASYNC], capture_output=True, text=True,
                          timeout=50, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "permutation ok" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0 and "repeat passed" not in proc.stdout, proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr[-3000:]


# ---------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("dtype", FLOATS + [torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("S", [1, 7, 64, 1000])
def test_pack_unpack_scatter_add(dtype, S):
    g = torch.Generator().manual_seed(S)
    C = 9
    def make(*shape):
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=g).to(dtype)
        return torch.randint(0, 50, shape, generator=g).to(dtype)
    buffer = make(C, S)
    ids = torch.tensor([4, 0, 8, 4, 2, 4])  # repeats: accumulate in order / last copy wins
    packed = hecate_op("pack_chunks")(buffer.to(CUDA), ids.to(CUDA))
    assert torch.equal(packed.cpu(), reference.pack_chunks(buffer, ids))
    assert torch.equal(hecate_op("pack_chunks")(buffer.to(CUDA), ids).cpu(), packed.cpu())  # host ids

    recv = make(len(ids), S)
    out = buffer.to(CUDA, copy=True)
    hecate_op("unpack_chunks")(recv.to(CUDA), ids.to(CUDA), out)
    expect = buffer.clone()
    for i, c in enumerate(ids.tolist()):
        expect[c] = recv[i]
    assert torch.equal(out.cpu(), expect)

    out = buffer.to(CUDA, copy=True)
    hecate_op("scatter_add_chunks")(recv.to(CUDA), ids.to(CUDA), out)
    expect = buffer.clone()
    reference.scatter_add_chunks(recv, ids, expect)
    assert torch.equal(out.cpu(), expect)  # same order of additions: bit-exact
    expect_cpu = buffer.clone()
    hecate_op("scatter_add_chunks")(recv, ids, expect_cpu)
    assert torch.equal(out.cpu(), expect_cpu)


def test_chunk_ops_empty_and_errors():
    buffer = torch.randn(3, 5, device=CUDA)
    none = torch.empty(0, dtype=torch.int64, device=CUDA)
    assert hecate_op("pack_chunks")(buffer, none).shape == (0, 5)
    hecate_op("scatter_add_chunks")(torch.empty(0, 5, device=CUDA), none, buffer)
    with pytest.raises(ValueError, match="recv_nS must have shape"):
        hecate_op("scatter_add_chunks")(torch.zeros(2, 5, device=CUDA), none, buffer)
    with pytest.raises(ValueError, match="dtype"):
        hecate_op("unpack_chunks")(torch.zeros(0, 5, device=CUDA, dtype=torch.float64), none, buffer)


def test_bad_arguments_name_themselves():
    rows = torch.zeros(2, 1, dtype=torch.long, device=CUDA)
    with pytest.raises(ValueError, match="x_TD is on cpu"):
        hecate_op("permute")(torch.zeros(2, 4), rows, 4, -1, None)
    with pytest.raises(ValueError, match="weights_TK is on cpu"):
        hecate_op("unpermute")(torch.zeros(2, 4, device=CUDA), rows, torch.ones(2, 1))
    with pytest.raises(ValueError, match="weights_TK must have shape"):
        hecate_op("unpermute")(torch.zeros(2, 4, device=CUDA), rows, torch.ones(2, 3, device=CUDA))
    with pytest.raises(ValueError, match="grad_TD must have shape"):
        hecate_op("unpermute_backward")(torch.zeros(3, 4, device=CUDA), torch.zeros(2, 4, device=CUDA),
                                        rows, None, False)
    with pytest.raises(ValueError, match="priority_TK must have shape"):
        hecate_op("permute")(torch.zeros(2, 4, device=CUDA), rows, 4, 1, torch.ones(2, 2, device=CUDA))
    with pytest.raises(ValueError, match="num_bins must be"):
        hecate_op("expert_histogram")(rows, 0)
    with pytest.raises(TypeError, match="y_ND has dtype"):
        hecate_op("unpermute")(torch.zeros(2, 4, dtype=torch.int32, device=CUDA), rows, None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_run_on_their_tensors_device_not_the_current_one():
    # Each op sets a CUDAGuard on its input's device and launches on that device's current
    # stream: with cuda:0 current, cuda:1 tensors must not be touched by a cuda:0 launch.
    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(21)
    logits, x = torch.randn(33, 8, generator=g), torch.randn(33, 16, generator=g)
    bins = torch.randint(-1, 4, (33, 2), generator=g)
    q, k, v = (torch.randn(1, n, 24, 32, generator=g) for n in (2, 1, 1))
    with torch.cuda.device(0):
        _, idx, _ = hecate_op("topk_gating")(logits.to(dev), 2, "softmax", True, None)
        x_ND, row_map, counts = hecate_op("permute")(x.to(dev), bins.to(dev), 4, -1, None)
        out = hecate_op("unpermute")(x_ND, row_map, None)
        grad_y, _ = hecate_op("unpermute_backward")(out, x_ND, row_map, None, False)
        packed = hecate_op("pack_chunks")(x.to(dev), torch.tensor([3, 0], device=dev))
        att, lse = hecate_op("flash_attention_fwd")(*(t.to(dev) for t in (q, k, v)), 0.0, True, 0, 0,
                                                    None, None, 0)
        dq, _, _ = hecate_op("flash_attention_bwd")(att, *(t.to(dev) for t in (q, k, v)), att, lse, 0.0, True,
                                                    0, 0, None, None, 0)
        torch.cuda.synchronize(dev)
    for t in (idx, x_ND, out, grad_y, packed, att, dq):
        assert t.device == dev
    assert torch.equal(idx.cpu(), hecate_op("topk_gating")(logits, 2, "softmax", True, None)[1])
    x_ref, row_ref, counts_ref = hecate_op("permute")(x, bins, 4, -1, None)
    assert torch.equal(x_ND.cpu(), x_ref) and torch.equal(row_map.cpu(), row_ref)
    close(out, hecate_op("unpermute")(x_ref, row_ref, None), torch.float32)
    assert torch.equal(packed.cpu(), x[[3, 0]])
    close(att, hecate_op("flash_attention_fwd")(q, k, v, 0.0, True, 0, 0, None, None, 0)[0], torch.float32)
