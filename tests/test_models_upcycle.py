"""BAM upcycling: N dense checkpoints -> FFN experts, attention experts, averaged rest, fresh routers."""
import pytest
import torch

from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.models.upcycle import upcycle_bam
from hecate.moe.config import MoEConfig

D, F_ = 32, 48


def _dense_cfg():
    moe = MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=1, top_k=1)
    return TransformerConfig(vocab_size=41, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                             dense_ffn_hidden=F_, moe_every=100, dense_activation="swiglu", rope=True,
                             parallel_block=True, tie_embeddings=False, moe=moe)


def _bam_cfg(n, shared_kv=False, **kw):
    c = _dense_cfg()
    c.moe = c.moe.replace(num_experts=n, activation="swiglu", aux_loss_coeff=0.01, z_loss_coeff=0.001)
    c.moe_every, c.attention, c.bam_attention_experts, c.bam_shared_kv = 1, "bam", n, shared_kv
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _dense(seed):
    torch.manual_seed(seed)
    return MoETransformer(_dense_cfg())


@pytest.mark.parametrize("shared_kv", [False, True])
def test_one_expert_upcycle_equals_dense_source(shared_kv):
    dense = _dense(0).eval()
    moe = upcycle_bam([dense.state_dict()], _bam_cfg(1, shared_kv)).eval()
    t = torch.randint(0, 41, (2, 12))
    torch.testing.assert_close(moe(t).logits, dense(t).logits)


def test_two_checkpoints_become_experts_and_branches():
    a, b = _dense(0), _dense(1)
    torch.manual_seed(5)
    moe = upcycle_bam([a.state_dict(), b.state_dict()], _bam_cfg(2))
    for i, blk in enumerate(moe.blocks):
        for e, src in enumerate((a, b)):
            s = src.blocks[i]
            torch.testing.assert_close(blk.ffn.experts.w1_EFD[e], s.ffn.fc1.weight)
            torch.testing.assert_close(blk.ffn.experts.w2_EDF[e], s.ffn.fc2.weight)
            torch.testing.assert_close(blk.ffn.experts.w3_EFD[e], s.ffn.fc3.weight)
            torch.testing.assert_close(blk.attn.branches[e].qkv.weight, s.attn.qkv.weight)
            torch.testing.assert_close(blk.attn.branches[e].out.weight, s.attn.out.weight)
        torch.testing.assert_close(blk.norm1.weight, (a.blocks[i].norm1.weight + b.blocks[i].norm1.weight) / 2)
    torch.testing.assert_close(moe.embed.weight, (a.embed.weight + b.embed.weight) / 2)
    torch.testing.assert_close(moe.head.weight, (a.head.weight + b.head.weight) / 2)
    # routers stay fresh (random), not zero or copied
    assert moe.blocks[0].attn.router.weight.abs().sum() > 0
    assert moe.blocks[0].ffn.router.weight_ED.abs().sum() > 0


def test_shared_kv_upcycle_averages_kv_and_keeps_queries():
    a, b = _dense(0), _dense(1)
    moe = upcycle_bam([a.state_dict(), b.state_dict()], _bam_cfg(2, shared_kv=True))
    hq = 32
    for i, blk in enumerate(moe.blocks):
        qa, qb = a.blocks[i].attn.qkv.weight, b.blocks[i].attn.qkv.weight
        torch.testing.assert_close(blk.attn.branches[0].q.weight, qa[:hq])
        torch.testing.assert_close(blk.attn.branches[1].q.weight, qb[:hq])
        torch.testing.assert_close(blk.attn.kv.weight, (qa[hq:] + qb[hq:]) / 2)


def test_upcycle_rejects_mismatched_inputs():
    sd = _dense(0).state_dict()
    with pytest.raises(ValueError, match="at least one"):
        upcycle_bam([], _bam_cfg(1))
    with pytest.raises(ValueError, match="bam_attention_experts"):
        upcycle_bam([sd, sd], _bam_cfg(1))
    wide = _bam_cfg(1)
    wide.moe = wide.moe.replace(ffn_hidden_size=64)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        upcycle_bam([sd], wide)
    with pytest.raises(ValueError, match="cfg.attention"):
        upcycle_bam([sd], _bam_cfg(1, attention="moh", moh_top_k=1))
    bad = dict(sd)
    bad.pop("embed.weight")
    with pytest.raises(ValueError, match="different keys"):
        upcycle_bam([sd, bad], _bam_cfg(2))
    with pytest.raises(ValueError, match="residual"):
        upcycle_bam([sd], _bam_cfg(1, moe=_bam_cfg(1).moe.replace(use_residual=True)))


def test_upcycle_rejects_shape_and_coverage_mismatches():
    sd = _dense(0).state_dict()
    with pytest.raises(ValueError, match="layer 0: MoE has 2 experts but there are 1 dense checkpoints"):
        upcycle_bam([sd], _bam_cfg(1, moe=_bam_cfg(2).moe))
    with pytest.raises(ValueError, match=r"no dense weights for \['pos.weight'\]"):
        upcycle_bam([sd], _bam_cfg(1, rope=False))
    with pytest.raises(ValueError, match=r"(embed|head).weight has shape \(41, 32\) in the dense checkpoints but \(50, 32\)"):
        upcycle_bam([sd], _bam_cfg(1, vocab_size=50))
    with pytest.raises(ValueError, match="dense checkpoints lack 'blocks.0.ffn.fc1.weight'; they must be"):
        upcycle_bam([upcycle_bam([sd], _bam_cfg(1)).state_dict()], _bam_cfg(1))
