"""Mixture-of-Mamba: the selective scan against a naive loop, modality-specific projections
(isolated per modality, shared conv/A/D), the generated two-modality data, parameter counts,
and training under the expert strategies."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hecate.data import interleaved_batch
from hecate.models.mamba import MambaConfig, MixtureOfMamba, ModalityMamba, causal_depthwise_conv, modality_linear
from hecate.models.registry import build_model, count_parameters, get_preset
from hecate.models.selective_scan import selective_scan
from hecate.moe.config import MoEConfig
from hecate.testing import run_distributed
from tests.training_cases import check_training
from tests.vision_cases import train_preset_case


def naive_scan(u, delta, A, B, C, D):
    """Element by element, straight from the recurrence."""
    b, l, e = u.shape
    n = A.shape[1]
    y = torch.zeros(b, l, e, dtype=torch.float64)
    for bi in range(b):
        for ei in range(e):
            h = [0.0] * n
            for t in range(l):
                acc = 0.0
                for ni in range(n):
                    h[ni] = (float(torch.exp(delta[bi, t, ei] * A[ei, ni])) * h[ni]
                             + float(delta[bi, t, ei] * B[bi, t, ni] * u[bi, t, ei]))
                    acc += float(C[bi, t, ni]) * h[ni]
                y[bi, t, ei] = acc + float(D[ei] * u[bi, t, ei])
    return y


def scan_inputs(b, l, e, n, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, e, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, l, e, generator=g))
    A = -torch.rand(e, n, generator=g) * 3
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D = torch.randn(e, generator=g)
    return u, delta, A, B, C, D


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 11), e=st.integers(1, 3), n=st.integers(1, 3),
       chunk=st.integers(1, 5), seed=st.integers(0, 1000))
def test_selective_scan_matches_naive_loop(b, l, e, n, chunk, seed):
    args = scan_inputs(b, l, e, n, seed)
    want = naive_scan(*args).float()
    for impl in ("sequential", "chunked"):
        got = selective_scan(*args, impl=impl, chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{impl}: {m}")


def test_chunked_and_sequential_gradients_agree():
    args = [t.requires_grad_() for t in scan_inputs(2, 13, 4, 3, 0)]
    grads = []
    for impl in ("sequential", "chunked"):
        y = selective_scan(*args, impl=impl, chunk_size=4)
        grads.append(torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum(), args))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_selective_scan_errors():
    u, delta, A, B, C, D = scan_inputs(1, 4, 2, 3, 0)
    with pytest.raises(ValueError, match="impl="):
        selective_scan(u, delta, A, B, C, D, impl="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(u, delta, A, B, C, D, chunk_size=0)
    with pytest.raises(ValueError, match="A_EN must be"):
        selective_scan(u, delta, A.t(), B, C, D)
    with pytest.raises(ValueError, match="B_BLN must be"):
        selective_scan(u, delta, A, B[:, :2], C, D)
    with pytest.raises(ValueError, match="D_E must be"):
        selective_scan(u, delta, A, B, C, D[:1])
    with pytest.raises(ValueError, match="u_BLE and delta_BLE"):
        selective_scan(u, delta[:, :2], A, B, C, D)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="impl='cuda' needs"):
            selective_scan(u, delta, A, B, C, D, impl="cuda")


@pytest.mark.gpu
def test_cuda_scan_matches_pytorch():
    args = [t.cuda() for t in scan_inputs(2, 37, 8, 4, 1)]
    want = selective_scan(*args, impl="sequential")
    for impl in ("auto", "chunked"):  # auto = mamba-ssm's kernel when importable, else chunked
        torch.testing.assert_close(selective_scan(*args, impl=impl, chunk_size=8), want, rtol=1e-3, atol=1e-3)


def test_causal_depthwise_conv_equals_conv1d():
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 9, 6)
    want = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, conv.weight, conv.bias), want)


def test_modality_linear_uses_each_tokens_own_weights():
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    mod = torch.tensor([1, 0, 2, 1, 1, 0, 2, 2, 0])
    w, b = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4)
    got = modality_linear(x, mod, w, b)
    want = torch.stack([x[i] @ w[m].t() + b[m] for i, m in enumerate(mod.tolist())])
    torch.testing.assert_close(got, want)
    modality_linear(x, torch.zeros(9, dtype=torch.long), w).sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad[1:]) == 0 and torch.count_nonzero(w.grad[0]) > 0


def tiny(**kw):
    torch.manual_seed(0)
    p = get_preset("tiny-mixture-of-mamba")
    return build_model(p.arch, dict(p.config, **kw))


@pytest.mark.parametrize("modality", [0, 1])
def test_tokens_never_touch_another_modalitys_projections(modality):
    model = tiny()
    tokens, _ = interleaved_batch(0, 2, 10)
    mod = torch.full_like(tokens, modality)
    model.loss(tokens[:, :-1], tokens[:, 1:], mod[:, :-1])[0].backward()
    other = 1 - modality
    for block in model.blocks:
        for name in ModalityMamba.MODALITY_PARAMS:
            g = getattr(block.mixer, name).grad
            assert torch.count_nonzero(g[other]) == 0, f"{name}[{other}] got gradient from modality {modality}"
            assert torch.count_nonzero(g[modality]) > 0, f"{name}[{modality}] got no gradient"
        for name, p in block.mixer.named_parameters():
            if name in ModalityMamba.SHARED_PARAMS:
                assert torch.count_nonzero(p.grad) > 0, f"shared {name} got no gradient from modality {modality}"


def test_mixed_sequence_routes_by_modality():
    """Changing modality-1 projections changes nothing at positions before the first modality-1
    token (causal), and changes the output at that token (its own projection is used)."""
    model = tiny()
    tokens = torch.randint(0, 64, (1, 8))
    mod = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 0]])
    before = model(tokens, mod).logits
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.in_proj_MXD[1].mul_(1.5)
    after = model(tokens, mod).logits
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3], after[:, 3])


def test_dense_variant_has_one_projection_set():
    model = tiny(modality_specific=False)
    assert model.blocks[0].mixer.in_proj_MXD.shape[0] == 1
    tokens, mod = interleaved_batch(0, 2, 9)
    assert model(tokens, mod).logits.shape == (2, 9, 64)


def test_input_and_config_errors():
    model = tiny()
    tokens, mod = interleaved_batch(0, 2, 9)
    with pytest.raises(ValueError, match="modality ids must be in"):
        model(tokens, mod + 1)
    with pytest.raises(ValueError, match="equal \\[B, L\\] shapes"):
        model(tokens, mod[:, :3])
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        MixtureOfMamba(MambaConfig(d_state=0))
    with pytest.raises(ValueError, match="moe_every > 0 needs"):
        MixtureOfMamba(MambaConfig(moe_every=1))
    with pytest.raises(ValueError, match="hidden_size=16 must equal"):
        MixtureOfMamba(MambaConfig(moe_every=1, moe=MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=2)))
    with pytest.raises(ValueError, match="dt_rank"):
        MixtureOfMamba(MambaConfig(dt_rank=0))


def test_interleaved_data():
    tokens, mod = interleaved_batch(5, 3, 40, text_vocab=32, image_vocab=32)
    t2, m2 = interleaved_batch(5, 1, 40, start=2)
    assert torch.equal(tokens[2:], t2) and torch.equal(mod[2:], m2)
    assert ((tokens < 32) == (mod == 0)).all(), "text ids below text_vocab, image ids above"
    assert (mod == 0).any() and (mod == 1).any()
    switches = (mod[:, 1:] != mod[:, :-1]).sum(1)
    assert (switches >= 40 // 8 - 1).all(), "segments of at most max_segment tokens alternate"
    for kw, match in ((dict(seq_len=0), "seq_len"), (dict(min_segment=5, max_segment=2), "max_segment")):
        with pytest.raises(ValueError, match=match):
            interleaved_batch(0, 1, **{"seq_len": 8, **kw})


def test_parameter_counts():
    model = tiny()
    c = count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    per_modality = sum(getattr(b.mixer, n).numel() // 2 for b in model.blocks for n in ModalityMamba.MODALITY_PARAMS)
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert c["total_params"] == total
    assert c["active_params"] == total - per_modality - experts // 2  # one of 2 modalities, top-2 of 4
    p = get_preset("mixture-of-mamba-790m")
    big = count_parameters(build_model(p.arch, dict(p.config), "meta"))
    # One modality's share is a Mamba-790M-sized model (~0.8B); both modalities ~1.5B in all.
    assert 0.75e9 < big["active_params"] < 0.85e9 and 1.45e9 < big["total_params"] < 1.6e9


@pytest.mark.parametrize("strategy,options", [("dp", {}), ("ep", {}), ("fssdp", {"overlap_degree": 2})])
def test_trains_under_strategy_like_single_process(strategy, options):
    """The strategies shard the MoE FFN experts; the modality projections are dense
    (replicated, gradients all-reduced) and are checked against the reference too."""
    results = run_distributed(train_preset_case, 2, "tiny-mixture-of-mamba", strategy, options, 5)
    check_training(results)
    losses = results[0]["losses"][0]
    assert losses[-1] < 0.85 * losses[0], losses
    assert results[0]["num_moe_layers"] == 2
    assert any("in_proj_MXD" in n for n in results[0]["dense"][0])


def test_modality_from_token_ids_and_trainer_shaped_data():
    from hecate.data import InterleavedTokenData

    model = tiny()
    data = InterleavedTokenData(batch_size=2, seq_len=9)
    x, y = data.train_batch(0, rank=1, world=2)
    tokens, mod = interleaved_batch(0, 2, 10, start=2)
    assert torch.equal(x, tokens[:, :-1]) and torch.equal(y, tokens[:, 1:])
    assert torch.equal(model.modality_of(x), mod[:, :-1])
    torch.testing.assert_close(model.loss(x, y)[0], model.loss(x, y, mod[:, :-1])[0])
    other, _ = data.train_batch(0, rank=0, world=2)
    assert not torch.equal(other, x), "ranks read disjoint samples"
    assert len(data.val_batches(2)) == 2
    with pytest.raises(ValueError, match="rank=2"):
        data.train_batch(0, rank=2, world=2)
    with pytest.raises(ValueError, match="modality_vocab_starts"):
        MixtureOfMamba(MambaConfig(modality_vocab_starts=[0, 100]))
    with pytest.raises(ValueError, match="modality_BL is required"):
        tiny(modality_vocab_starts=None)(x)


def test_bf16_autocast_trains():
    model = tiny()
    tokens, mod = interleaved_batch(0, 2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:], mod[:, :-1])
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].mixer.A_log_EN.grad.isfinite().all()
