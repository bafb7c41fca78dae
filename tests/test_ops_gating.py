"""topk_gating: the hecate._C kernel against the PyTorch reference, autograd and input checks."""
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


@st.composite
def gating_inputs(draw):
    T = draw(st.integers(0, 24))
    E = draw(st.integers(1, 12))
    k = draw(st.integers(1, min(4, E)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # few distinct values: many exact ties
        logits = torch.randint(-2, 3, (T, E), generator=gen).to(dtype)
    else:
        logits = (3 * torch.randn(T, E, generator=gen)).to(dtype)
    bias = None
    if draw(st.booleans()):
        bias = torch.randint(0, 2, (E,), generator=gen).to(torch.float32) * 0.25
    return logits, k, bias


@SETTINGS
@given(gating_inputs(), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_kernel_matches_reference(inputs, score_func, renormalize):
    logits, k, bias = inputs
    w, idx, s = kernel("topk_gating")(logits, k, score_func, renormalize, bias)
    w_ref, idx_ref, s_ref = ref.topk_gating(logits, k, score_func, renormalize, bias)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert w.dtype == s.dtype == expected_dtype and idx.dtype == torch.int64
    assert w.shape == (logits.shape[0], k) and s.shape == logits.shape
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref)


def test_ties_go_to_lower_index_and_order_is_descending():
    logits = torch.tensor([[1.0, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 5.0]])
    _, idx, _ = kernel("topk_gating")(logits, 3, "softmax", True, None)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2], [3, 0, 2]]


def test_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 10.0])
    w, idx, s = kernel("topk_gating")(logits, 1, "sigmoid", False, bias)
    assert idx.tolist() == [[2]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0]])))


def test_renormalized_weights_sum_to_one():
    logits = torch.randn(64, 16)
    for score_func in ("softmax", "sigmoid"):
        w, _, _ = ops.topk_gating(logits, 4, score_func, True)
        torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_zero_tokens():
    w, idx, s = kernel("topk_gating")(torch.empty(0, 8), 2, "softmax", True, None)
    assert w.shape == (0, 2) and idx.shape == (0, 2) and s.shape == (0, 8)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck_float64(score_func, renormalize):
    kernel("topk_gating")
    # Well separated logits: the top-k choice must not flip under the finite differences.
    logits = (torch.randperm(6 * 5).reshape(6, 5).double() * 0.1).requires_grad_()
    bias = torch.linspace(0, 0.1, 5, dtype=torch.float64)

    def fn(x):
        w, _, s = ops.topk_gating(x, 2, score_func, renormalize, bias)
        return w, s

    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gradients_match_reference(dtype, score_func):
    kernel("topk_gating")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(33, 10, generator=gen).to(dtype)
    gw, gs = torch.randn(33, 3, generator=gen), torch.randn(33, 10, generator=gen)
    grads = []
    for impl in (ops, ref):
        x = logits.clone().requires_grad_()
        w, _, s = impl.topk_gating(x, 3, score_func, True)
        ((w * gw).sum() + (s * gs).sum()).backward()
        grads.append(x.grad)
    assert grads[0].dtype == dtype
    torch.testing.assert_close(grads[0], grads[1])


def test_weights_only_loss_gives_gradient():
    kernel("topk_gating")
    x = torch.randn(8, 6, requires_grad=True)
    w, _, _ = ops.topk_gating(x, 2)
    (w[:, 0] * torch.arange(8.0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("args, match", [
    ((torch.randn(8), 2), "logits_TE"),
    ((torch.randint(0, 3, (4, 8)), 2), "logits_TE"),
    ((torch.randn(4, 8), 9), "k = 9 exceeds"),
    ((torch.randn(4, 8), 0), "k must be >= 1"),
    ((torch.randn(4, 8), 2, "relu"), "score_func"),
    ((torch.randn(4, 8), 2, "softmax", True, torch.randn(7)), "bias_E"),
    ((torch.randn(4, 8), 2, "softmax", True, torch.randn(1, 8)), "bias_E"),
    ((torch.randn(4, 8), 2, "softmax", True, torch.randn(8, device="meta")), "bias_E is on meta"),
])
def test_bad_input_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ops.topk_gating(*args)


def test_kernel_rejects_bad_k_with_value_error():
    with pytest.raises(ValueError, match="k must be in"):
        kernel("topk_gating")(torch.randn(4, 3), 4, "softmax", True, None)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_gating(torch.randn(4, 8), 2.0)
    with pytest.raises(TypeError, match="logits_TE must be a torch.Tensor"):
        ops.topk_gating([[0.0, 1.0]], 1)
