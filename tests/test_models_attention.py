"""Attention variants of the zoo: GQA, RoPE, MoH (learned and query-norm routers), BAM
attention experts and parallel blocks — each checked against its defining equation."""
import torch
import torch.nn.functional as F

from hecate.models.attention import Attention, BAMAttention, MoHAttention, apply_rope, rope_tables
from hecate.models.transformer import Block, MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig

D, H = 32, 4


def _x(B=2, S=7, seed=0):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


def _moh(**kw):
    torch.manual_seed(1)
    return MoHAttention(D, H, **kw)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Attention(D, H, n_kv_heads=2)
    mha = Attention(D, H)
    hd = D // H
    q, k, v = gqa.qkv.weight.split([H * hd, 2 * hd, 2 * hd])
    rep = lambda w: w.view(2, hd, D).repeat_interleave(2, dim=0).reshape(H * hd, D)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.out.weight.copy_(gqa.out.weight)
    x = _x()
    rope = rope_tables(7, hd, 10000.0)
    torch.testing.assert_close(gqa(x), mha(x))
    torch.testing.assert_close(gqa(x, rope), mha(x, rope))
    assert gqa.qkv.weight.shape == ((H + 4) * hd, D)


def test_rope_scores_depend_only_on_relative_position():
    hd = 8
    cos, sin = rope_tables(20, hd, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)

    def at(v, pos):
        return apply_rope(v.view(1, 1, 1, hd).expand(1, 1, 20, hd), (cos, sin))[0, 0, pos]

    s1 = at(q, 5) @ at(k, 2)
    s2 = at(q, 15) @ at(k, 12)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(at(q, 0), q)                    # position 0: no rotation
    torch.testing.assert_close(at(q, 9).norm(), q.norm())      # a rotation keeps the norm
    assert not torch.allclose(at(q, 5) @ at(k, 2), at(q, 5) @ at(k, 4))


def _copy_dense(dst, src):
    with torch.no_grad():
        dst.qkv.weight.copy_(src.qkv.weight)
        dst.out.weight.copy_(src.out.weight)


def test_moh_all_heads_uniform_weights_equals_mha():
    for shared in (0, 1, 2):
        moh = _moh(n_shared=shared, top_k=H - shared)  # every head active
        with torch.no_grad():
            for p in moh.router.parameters():
                p.zero_()                                # uniform router outputs
        mha = Attention(D, H)
        _copy_dense(mha, moh)
        x = _x()
        y, aux = moh(x)
        torch.testing.assert_close(y, mha(x))
        assert aux.item() > 0


def test_moh_output_is_gated_sum_of_heads():
    moh = _moh(n_shared=1, top_k=1)
    x = _x()
    y, _ = moh(x)
    g_TH, _ = moh.gates(x.reshape(-1, D), None)
    heads = Attention.heads(moh, x)                                # [B, S, H, d]
    hd = D // H
    want = sum(g_TH[:, i].view(2, 7, 1) * F.linear(heads[:, :, i], moh.out.weight[:, i * hd:(i + 1) * hd])
               for i in range(H))
    torch.testing.assert_close(y, want)
    # exactly the shared head + top_k routed heads are on, each group weighted by the 2-way mix
    assert ((g_TH > 0).sum(1) == 2).all()
    assert (g_TH[:, 0] > 0).all()


def test_moh_balance_loss_is_beta_sum_p_f_and_reaches_the_router():
    moh = _moh(n_shared=1, top_k=2, balance_coeff=0.05)
    x = _x()
    _, aux = moh(x)
    x_TD = x.reshape(-1, D)
    p = torch.softmax(x_TD @ moh.router.routed.weight.t(), -1)
    idx = p.topk(2, -1).indices
    f = torch.zeros_like(p).scatter_(1, idx, 1.0).mean(0)
    torch.testing.assert_close(aux, 0.05 * (p.mean(0) * f).sum())
    aux.backward()
    assert moh.router.routed.weight.grad.abs().sum() > 0


def test_moh_query_norm_router_converts_dense_attention():
    mha = Attention(D, H)
    conv = MoHAttention(D, H, n_shared=1, top_k=H - 1, router="query_norm")
    conv.load_state_dict(mha.state_dict())          # same parameters: a dense checkpoint loads as is
    x = _x()
    torch.testing.assert_close(conv(x), mha(x))      # all heads on: the dense attention
    sparse = MoHAttention(D, H, n_shared=1, top_k=1, router="query_norm")
    sparse.load_state_dict(mha.state_dict())
    hd = D // H
    with torch.no_grad():                            # head 2 gets by far the largest queries
        sparse.qkv.weight[2 * hd:3 * hd] *= 50
    q, _, _ = sparse.project(x, None)
    qn = q[:, 1:].norm(dim=-1).permute(0, 2, 1).reshape(-1, H - 1)
    g, aux = sparse.gates(x.reshape(-1, D), qn)
    assert aux is None
    want = torch.zeros(14, H)
    want[:, 0] = want[:, 2] = 1.0
    torch.testing.assert_close(g, want)


def test_bam_identical_branches_equal_one_attention_whatever_the_router():
    torch.manual_seed(0)
    one = Attention(D, H, n_kv_heads=2)
    bam = BAMAttention(D, H, n_kv_heads=2, num_experts=3)
    for b in bam.branches:
        _copy_dense(b, one)
    x = _x()
    rope = rope_tables(7, D // H, 10000.0)
    torch.testing.assert_close(bam(x, rope), one(x, rope))


def test_bam_shared_kv_is_soft_mix_of_branches():
    torch.manual_seed(0)
    bam = BAMAttention(D, H, num_experts=2, shared_kv=True)
    x = _x()
    w = torch.softmax(x @ bam.router.weight.t(), -1)
    hd = D // H
    ys = []
    for b in bam.branches:  # each branch = an Attention with [its q | the shared kv]
        a = Attention(D, H)
        with torch.no_grad():
            a.qkv.weight.copy_(torch.cat([b.q.weight, bam.kv.weight]))
            a.out.weight.copy_(b.out.weight)
        ys.append(a(x))
    torch.testing.assert_close(bam(x), w[..., :1] * ys[0] + w[..., 1:] * ys[1])
    assert bam.kv.weight.shape == (2 * H * hd, D)


def _cfg(**kw):
    moe = MoEConfig(hidden_size=D, ffn_hidden_size=16, num_experts=2, top_k=1)
    base = dict(vocab_size=31, d_model=D, n_layers=2, n_heads=H, max_seq_len=16, dense_ffn_hidden=24,
                moe_every=2, moe=moe)
    return TransformerConfig(**{**base, **kw})


def test_parallel_block_reads_one_normed_input():
    torch.manual_seed(0)
    cfg = _cfg(parallel_block=True, moe_every=5)
    block = Block(cfg, moe=False)
    assert block.norm2 is None
    x = _x()
    h = block.norm1(x)
    torch.testing.assert_close(block(x, [], []), x + block.attn(h) + block.ffn(h))


def test_models_are_causal_for_every_attention():
    for kw in (dict(), dict(rope=True, n_kv_heads=2), dict(attention="moh", moh_shared_heads=1, moh_top_k=2, rope=True),
               dict(attention="moh", moh_router="query_norm", moh_shared_heads=2, moh_top_k=1),
               dict(attention="bam", bam_attention_experts=2, parallel_block=True, rope=True),
               dict(attention="bam", bam_attention_experts=2, bam_shared_kv=True, n_kv_heads=1)):
        torch.manual_seed(0)
        model = MoETransformer(_cfg(**kw)).eval()
        t = torch.randint(0, 31, (1, 10))
        t2 = t.clone()
        t2[0, 6:] = (t2[0, 6:] + 1) % 31
        a, b = model(t).logits, model(t2).logits
        torch.testing.assert_close(a[:, :6], b[:, :6], msg=lambda m: f"{kw}: {m}")
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_moh_aux_loss_is_part_of_the_model_loss():
    torch.manual_seed(0)
    cfg = _cfg(attention="moh", moh_shared_heads=1, moh_top_k=1, moe_every=100, moh_balance_coeff=0.5)
    model = MoETransformer(cfg)
    t = torch.randint(0, 31, (2, 8))
    loss, out = model.loss(t, t)
    assert out.moe_stats == [] and out.aux_loss.item() > 0
    torch.testing.assert_close(loss - out.aux_loss, F.cross_entropy(out.logits.flatten(0, 1), t.flatten()))
    loss.backward()
    assert model.blocks[0].attn.router.routed.weight.grad.abs().sum() > 0


def test_attention_modules_reject_bad_arguments():
    import pytest

    with pytest.raises(ValueError, match="even head_dim"):
        rope_tables(4, 7, 10000.0)
    with pytest.raises(ValueError, match=r"model.d_model \(32\) must be divisible by model.n_heads \(5\)"):
        Attention(D, 5)
    with pytest.raises(ValueError, match=r"moh_shared_heads \(4\)"):
        MoHAttention(D, H, n_shared=4)
    with pytest.raises(ValueError, match=r"moh_top_k \(0\)"):
        MoHAttention(D, H, n_shared=1, top_k=0)
    with pytest.raises(ValueError, match="moh_router='x'"):
        MoHAttention(D, H, router="x")
    with pytest.raises(ValueError, match="bam_attention_experts must be >= 1"):
        BAMAttention(D, H, num_experts=0)
