"""The experts' GELU on the CPU sees a bounded set of shapes however the row counts vary.

oneDNN JIT-compiles and caches one GELU kernel (forward and backward) per input shape. Under
fssdp / ep the rows an expert block receives change every step, and each new count used to
add kernels to that cache for good: resident memory grew ~2 MB per step per rank in
benchmarks/soak.py. The rows are padded to a bucket (hecate.moe.experts.gelu_rows).
"""
import pytest
import torch
import torch.nn.functional as F

from hecate.moe import grouped_mlp
from hecate.moe.experts import gelu_rows


@pytest.fixture
def gelu_shapes(monkeypatch):
    shapes, gelu = set(), F.gelu

    def spy(x, *args, **kwargs):
        shapes.add(tuple(x.shape))
        return gelu(x, *args, **kwargs)

    monkeypatch.setattr(F, "gelu", spy)
    return shapes


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_gelu_shapes_stay_bounded_as_row_counts_vary(gelu_shapes, impl):
    torch.manual_seed(0)
    g, d, f = 2, 8, 16
    w1 = torch.randn(g, f, d, requires_grad=True)
    w2 = torch.randn(g, d, f, requires_grad=True)
    for n in range(1, 200):  # a different row count every call, as fssdp's received rows
        counts = torch.tensor([n // 2, n - n // 2])
        x = torch.randn(n, d, requires_grad=True)
        grouped_mlp(x, counts, w1, w2, None, "gelu", impl).sum().backward()
    # 16 small counts + 8 buckets per power of two from 16 to 256: 48 at most (was 199 / ~100).
    assert len(gelu_shapes) <= 16 + 8 * 4, sorted(gelu_shapes)
    assert all(rows == gelu_rows(rows) for rows, _ in gelu_shapes)


def test_gelu_rows_buckets():
    for n in range(0, 5000):
        rows = gelu_rows(n)
        assert n <= rows <= max(n, 16) * 9 // 8 + 1
        assert gelu_rows(rows) == rows  # a bucket is its own bucket
    assert len({gelu_rows(n) for n in range(1, 1 << 14)}) <= 16 + 8 * 10


@pytest.mark.parametrize("n", [1, 17, 37, 130, 301])
def test_padded_gelu_gives_the_same_values_and_gradients(n):
    torch.manual_seed(n)
    g, d, f = 3, 8, 16
    w1 = torch.randn(g, f, d, requires_grad=True)
    w2 = torch.randn(g, d, f, requires_grad=True)
    counts = torch.tensor([n // 3, n // 3, n - 2 * (n // 3)])
    x = torch.randn(n, d, requires_grad=True)
    y = grouped_mlp(x, counts, w1, w2, None, "gelu", "loop" if n % 2 else "grouped_mm")
    grads = torch.autograd.grad(y.square().sum(), (x, w1, w2))
    # Reference: the unpadded GELU of each block, per row.
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        ref.append(F.gelu(x[start:start + c] @ w1[e].t()) @ w2[e].t())
        start += c
    ref = torch.cat(ref)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w1, w2))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
