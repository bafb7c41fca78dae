"""Models on hecate's attention kernels train like models on SDPA: same losses, gradients and
parameters over a few optimizer steps (Attention with GQA + RoPE, MoH with shared heads and
both routers, BAM with and without shared K/V)."""
import copy

import pytest
import torch

import hecate.ops as ops
from hecate.models import attention as attention_mod
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig

CASES = {
    "gqa_rope": dict(attention="mha", n_kv_heads=2, rope=True),
    "moh_learned": dict(attention="moh", moh_shared_heads=1, moh_top_k=2),
    "moh_query_norm": dict(attention="moh", moh_top_k=2, moh_router="query_norm", rope=True),
    "bam": dict(attention="bam", bam_attention_experts=2, n_kv_heads=2),
    "bam_shared_kv": dict(attention="bam", bam_attention_experts=2, bam_shared_kv=True, parallel_block=True),
}


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    attention_mod.set_attention_backend(None)


def _train(model, tokens, backend, steps=3):
    attention_mod.set_attention_backend(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return torch.stack(losses), grads, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_path_trains_like_sdpa(name):
    assert ops.extension_available(), "hecate._C is not built: run `make build`"
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=160,
                            dense_ffn_hidden=32, moe=MoEConfig(hidden_size=32, ffn_hidden_size=32,
                                                               num_experts=4, top_k=2), **CASES[name])
    model = MoETransformer(cfg)
    twin = copy.deepcopy(model)
    # 150 tokens: more than one query tile (128 rows) of the CPU kernel
    tokens = torch.randint(0, 64, (2, 151), generator=torch.Generator().manual_seed(1))
    loss_k, grads_k, params_k = _train(model, tokens, "kernel")
    loss_s, grads_s, params_s = _train(twin, tokens, "sdpa")
    torch.testing.assert_close(loss_k, loss_s, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_s.keys()
    for n in grads_k:
        torch.testing.assert_close(grads_k[n], grads_s[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    for n in params_k:
        torch.testing.assert_close(params_k[n], params_s[n], rtol=1e-4, atol=1e-5)


def test_kernel_is_the_default_on_cpu_when_built():
    assert ops.extension_available()
    assert attention_mod.use_attention_kernels(torch.device("cpu"))
    attention_mod.set_attention_backend("sdpa")
    assert not attention_mod.use_attention_kernels(torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        attention_mod.set_attention_backend("flash")


def test_moh_kernel_path_skips_unselected_heads(monkeypatch):
    """The MoH block hands the kernel only the chosen heads: shared + top_k per token."""
    seen = {}
    real = attention_mod.attention_ops.moh_attention

    def spy(q, k, v, heads, weights, **kw):
        seen["heads"] = heads
        return real(q, k, v, heads, weights, **kw)

    monkeypatch.setattr(attention_mod.attention_ops, "moh_attention", spy)
    attention_mod.set_attention_backend("kernel")
    block = attention_mod.MoHAttention(32, 8, n_shared=2, top_k=3)
    block(torch.randn(2, 9, 32))
    heads = seen["heads"]
    assert heads.shape == (2, 9, 5)
    assert bool((heads[..., :2] == torch.tensor([0, 1])).all()) and bool((heads[..., 2:] >= 2).all())


def test_lightning_attention_option():
    """model.attention = lightning: the block equals its defining equation and a model trains on it."""
    from hecate.models.attention import LightningAttention, lightning_decays
    from hecate.ops import reference as ref

    torch.manual_seed(0)
    block = LightningAttention(32, 4, n_kv_heads=2, block_size=5)
    x = torch.randn(2, 23, 32)
    q, k, v = block.qkv(x).split([32, 16, 16], dim=-1)
    q = torch.nn.functional.silu(q).view(2, 23, 4, 8).transpose(1, 2)
    k = torch.nn.functional.silu(k).view(2, 23, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = v.view(2, 23, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    o = ref.lightning_attention(q, k, v, lightning_decays(4))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(block(x), block.out(o.transpose(1, 2).reshape(2, 23, 32)), rtol=1e-4, atol=1e-5)

    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, dense_ffn_hidden=32,
                            moe=MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2),
                            attention="lightning", lightning_block_size=16, rope=True)
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    with pytest.raises(ValueError, match="lightning_block_size"):
        TransformerConfig(attention="lightning", lightning_block_size=0).validate()


def test_inspect_reports_active_attention_flops():
    """MoH's active attention FLOPs are the dense ones times (shared + top_k) / heads."""
    from hecate.train.model_stats import build_meta_model, param_counts

    base = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=8, max_seq_len=128, dense_ffn_hidden=32,
                moe=MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=4, top_k=2))
    mha = param_counts(build_meta_model(TransformerConfig(**base)))
    assert mha["attention_flops_per_seq"] == mha["active_attention_flops_per_seq"] == 2 * 8 * 2 * 8 * 128 * 129
    moh = param_counts(build_meta_model(TransformerConfig(**base, attention="moh", moh_shared_heads=2, moh_top_k=2)))
    assert moh["attention_flops_per_seq"] == mha["attention_flops_per_seq"]
    assert moh["active_attention_flops_per_seq"] == mha["attention_flops_per_seq"] // 2
