"""grouped_mlp (both implementations), GroupedExperts, dense parts."""
import pytest
import torch

from hecate.moe import DenseMLP, GroupedExperts, ResidualMix, SharedExperts, grouped_mlp
from hecate.moe.experts import dense_mlp


def per_row_oracle(x, counts, w1, w2, w3, act):
    out, start = [], 0
    for g, c in enumerate(counts.tolist()):
        xg = x[start:start + c]
        out.append(dense_mlp(xg, w1[g], w2[g], None if w3 is None else w3[g], act))
        start += c
    return torch.cat(out)


def make(g, d, f, act, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    w1 = torch.randn(g, f, d, dtype=dtype, requires_grad=True)
    w2 = torch.randn(g, d, f, dtype=dtype, requires_grad=True)
    w3 = torch.randn(g, f, d, dtype=dtype, requires_grad=True) if act == "swiglu" else None
    return w1, w2, w3


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_grouped_mlp_matches_oracle_with_empty_groups(impl, act):
    g, d, f = 4, 8, 16  # 16-byte aligned rows in fp32 for _grouped_mm
    w1, w2, w3 = make(g, d, f, act)
    counts = torch.tensor([3, 0, 5, 0])
    x = torch.randn(8, d, requires_grad=True)
    y = grouped_mlp(x, counts, w1, w2, w3, act, impl=impl)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w1, w2] + ([w3] if w3 is not None else []), gy)
    ref = per_row_oracle(x, counts, w1, w2, w3, act)
    ref_grads = torch.autograd.grad(ref, [x, w1, w2] + ([w3] if w3 is not None else []), gy)
    assert torch.allclose(y, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)
    assert grads[1][1].abs().sum() == 0  # empty expert gets a zero (not missing) gradient


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_grouped_mlp_zero_rows_and_sum_backward(impl):
    w1, w2, _ = make(3, 8, 8, "gelu")
    x = torch.zeros(0, 8, requires_grad=True)
    y = grouped_mlp(x, torch.zeros(3, dtype=torch.long), w1, w2, impl=impl)
    assert y.shape == (0, 8)
    y.sum().backward()  # expanded (stride-0) gradient must be accepted
    assert w1.grad is not None and w1.grad.abs().sum() == 0


def test_grouped_mlp_bf16_close_to_fp32():
    w1, w2, w3 = make(2, 16, 32, "swiglu", seed=1)
    x = torch.randn(10, 16)
    counts = torch.tensor([4, 6])
    ref = grouped_mlp(x, counts, w1, w2, w3, "swiglu", impl="loop")
    got = grouped_mlp(x.bfloat16(), counts, w1.bfloat16(), w2.bfloat16(), w3.bfloat16(), "swiglu")
    assert got.dtype == torch.bfloat16
    assert ((got.float() - ref).norm() / ref.norm()).item() < 3e-2


def test_auto_falls_back_to_loop_for_unaligned_shapes():
    w1, w2, _ = make(2, 5, 3, "gelu")  # 5 * 4 bytes is not a multiple of 16
    x = torch.randn(4, 5)
    y = grouped_mlp(x, torch.tensor([1, 3]), w1, w2)
    assert torch.allclose(y, per_row_oracle(x, torch.tensor([1, 3]), w1, w2, None, "gelu"), atol=1e-5)


def test_grouped_mlp_bad_inputs_name_the_argument():
    w1, w2, w3 = make(2, 8, 8, "swiglu")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="counts_G"):
        grouped_mlp(x, torch.tensor([4]), w1, w2, w3, "swiglu")
    with pytest.raises(ValueError, match="w3_GFD"):
        grouped_mlp(x, torch.tensor([2, 2]), w1, w2, None, "swiglu")
    with pytest.raises(ValueError, match="x_ND"):
        grouped_mlp(torch.randn(4, 7), torch.tensor([2, 2]), w1, w2, w3, "swiglu")
    with pytest.raises(ValueError, match="activation"):
        grouped_mlp(x, torch.tensor([2, 2]), w1, w2, None, "relu")
    with pytest.raises(ValueError, match="counts_G sums"):
        grouped_mlp(x, torch.tensor([2, 1]), w1, w2, w3, "swiglu", impl="loop")
    with pytest.raises(ValueError, match="impl"):
        grouped_mlp(x, torch.tensor([2, 2]), w1, w2, w3, "swiglu", impl="fast")


def test_grouped_experts_params_and_expert_forward():
    ex = GroupedExperts(3, 8, 16, "swiglu")
    assert ex.w1_EFD.shape == (3, 16, 8) and ex.w2_EDF.shape == (3, 8, 16) and ex.w3_EFD.shape == (3, 16, 8)
    assert ex.w1_EFD.abs().max() <= 8 ** -0.5 and ex.w2_EDF.abs().max() <= 16 ** -0.5
    x = torch.randn(5, 8)
    y = ex(x, torch.tensor([0, 5, 0]))
    assert torch.allclose(y, ex.expert_forward(1, x), atol=1e-5)
    assert GroupedExperts(2, 4, 4, "gelu").w3_EFD is None
    with pytest.raises(ValueError, match="activation"):
        GroupedExperts(2, 4, 4, "relu")


def test_shared_experts_equal_sum_of_separate_experts():
    sh = SharedExperts(8, 4, 2, "gelu")
    x = torch.randn(3, 8)
    a = dense_mlp(x, sh.w1_FD[:4], sh.w2_DF[:, :4], None, "gelu")
    b = dense_mlp(x, sh.w1_FD[4:], sh.w2_DF[:, 4:], None, "gelu")
    assert torch.allclose(sh(x), a + b, atol=1e-6)
    with pytest.raises(ValueError, match="num_shared"):
        SharedExperts(8, 4, 0)


def test_residual_mix_is_softmax_convex_combination():
    mix = ResidualMix(8, 16, "gelu")
    x, moe = torch.randn(4, 8), torch.randn(4, 8)
    c = torch.softmax(mix.coefficient(x), -1)
    assert torch.allclose(mix(x, moe), moe * c[:, :1] + mix.mlp(x) * c[:, 1:], atol=1e-6)
    assert isinstance(mix.mlp, DenseMLP)


# ---- the grouped GEMM path is chosen once; real errors raise ---------------------------------
@pytest.fixture
def fresh_choice():
    from hecate.moe import experts

    experts._auto_impl.cache_clear()
    yield experts
    experts._auto_impl.cache_clear()


def _fake_grouped_mm(errors, real):
    """torch._grouped_mm that raises errors.pop(0) while the list is not empty, else runs."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return real(*args, **kwargs)
    return fake, calls


def test_out_of_memory_raises_and_does_not_switch_to_the_loop(fresh_choice, monkeypatch):
    experts = fresh_choice
    w1, w2, _ = make(2, 8, 16, "gelu")
    x, counts = torch.randn(6, 8), torch.tensor([2, 4])
    assert experts.auto_impl(x.device, x.dtype) == "grouped_mm"  # probed once, fine
    errors = [torch.OutOfMemoryError("CUDA out of memory (mocked)")]
    fake, calls = _fake_grouped_mm(errors, torch._grouped_mm)
    monkeypatch.setattr(torch, "_grouped_mm", fake)
    with pytest.raises(torch.OutOfMemoryError):
        grouped_mlp(x, counts, w1, w2)
    y = grouped_mlp(x, counts, w1, w2)  # the next call still takes the grouped path
    assert len(calls) == 1 + 2  # the failed call, then two GEMMs (gelu: w1, w2)
    assert torch.allclose(y, per_row_oracle(x, counts, w1, w2, None, "gelu"), atol=1e-5)


def test_runtime_error_of_a_real_call_raises(fresh_choice, monkeypatch):
    experts = fresh_choice
    experts.auto_impl(torch.device("cpu"), torch.float32)
    fake, _ = _fake_grouped_mm([RuntimeError("transient failure (mocked)")], torch._grouped_mm)
    monkeypatch.setattr(torch, "_grouped_mm", fake)
    w1, w2, _ = make(2, 8, 16, "gelu")
    with pytest.raises(RuntimeError, match="transient failure"):
        grouped_mlp(torch.randn(6, 8), torch.tensor([2, 4]), w1, w2)
    assert experts.auto_impl(torch.device("cpu"), torch.float32) == "grouped_mm"


def test_unsupported_grouped_mm_is_probed_once_and_warned(fresh_choice, monkeypatch):
    experts = fresh_choice
    fake, calls = _fake_grouped_mm([RuntimeError("not supported on this device (mocked)")],
                                   torch._grouped_mm)
    monkeypatch.setattr(torch, "_grouped_mm", fake)
    w1, w2, _ = make(2, 8, 16, "gelu")
    x, counts = torch.randn(6, 8), torch.tensor([2, 4])
    with pytest.warns(RuntimeWarning, match="per-expert loop"):
        y = grouped_mlp(x, counts, w1, w2)
    assert torch.allclose(y, per_row_oracle(x, counts, w1, w2, None, "gelu"), atol=1e-5)
    grouped_mlp(x, counts, w1, w2)
    assert len(calls) == 1  # only the probe ever called it: the loop was chosen once


def test_probe_out_of_memory_is_not_cached(fresh_choice, monkeypatch):
    experts = fresh_choice
    fake, _ = _fake_grouped_mm([torch.OutOfMemoryError("mocked")], torch._grouped_mm)
    monkeypatch.setattr(torch, "_grouped_mm", fake)
    with pytest.raises(torch.OutOfMemoryError):
        experts.auto_impl(torch.device("cpu"), torch.float32)
    assert experts.auto_impl(torch.device("cpu"), torch.float32) == "grouped_mm"


def test_cuda_grouped_mm_only_on_sm90_bf16(fresh_choice):
    experts = fresh_choice
    # Decided without touching a device: below sm_90, or fp32, the loop runs.
    assert experts._auto_impl("cuda", (8, 0), torch.bfloat16) == "loop"
    assert experts._auto_impl("cuda", (9, 0), torch.float32) == "loop"
