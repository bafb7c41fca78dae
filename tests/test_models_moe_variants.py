"""PR-MoE (pyramid + residual) and DeepSeekMoE (fine-grained + shared experts, first layer
dense, no renormalization, expert/device balance) as configurations of MoETransformer."""
import copy

import pytest
import torch

from hecate.models.registry import build_model, get_preset
from hecate.models.transformer import DenseMLP, MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig


def _preset(name, seed=0):
    torch.manual_seed(seed)
    p = get_preset(name)
    return build_model(p.arch, p.config)


def test_prmoe_pyramid_gives_each_moe_layer_its_expert_count():
    model = _preset("tiny-prmoe")
    assert [type(b.ffn).__name__ for b in model.blocks] == ["DenseMLP", "MoELayer", "DenseMLP", "MoELayer"]
    assert [layer.config.num_experts for layer in model.moe_layers()] == [2, 4]
    assert [layer.experts.w1_EFD.shape[0] for layer in model.moe_layers()] == [2, 4]
    assert all(layer.residual is not None and layer.config.top_k == 1 for layer in model.moe_layers())


def test_prmoe_residual_mixes_dense_mlp_and_top1_expert():
    layer = _preset("tiny-prmoe").moe_layers()[1]
    plain = copy.deepcopy(layer)
    plain.residual = None
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    coef = layer.residual.coefficient
    with torch.no_grad():
        coef.weight.zero_()
        coef.bias.copy_(torch.tensor([0.0, 1.0]))  # (c0, c1) = softmax(0, 1) for every token
    c0, c1 = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    want = plain(x).y * c0 + layer.residual.mlp(x) * c1
    torch.testing.assert_close(layer(x).y, want)


def test_deepseek_first_layer_dense_shared_experts_see_every_token():
    model = _preset("tiny-deepseek")
    assert isinstance(model.blocks[0].ffn, DenseMLP) and model.blocks[0].ffn.fc3 is not None
    assert model.pos is None and model.head is not None       # RoPE, untied embeddings
    layer = model.moe_layers()[0]
    seen = []
    layer.shared_experts.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.experts.w2_EDF.zero_()                           # routed experts output 0
    y = layer(x).y
    assert seen == [18]
    torch.testing.assert_close(y, layer.shared_experts(x.reshape(-1, 32)).view(2, 9, 32))
    assert (y.abs().sum(-1) > 0).all()


def test_deepseek_gates_are_not_renormalized_and_both_balance_losses_apply():
    model = _preset("tiny-deepseek")
    layer = model.moe_layers()[0]
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    r = layer.route(x, top_k=3, capacity_factor=None, group_sizes=[12])
    probs = torch.softmax(x @ layer.router.weight_ED.t(), -1)
    torch.testing.assert_close(r.weights_TK, probs.topk(3, -1).values)
    assert (r.weights_TK.sum(-1) < 1 - 1e-3).all()
    assert set(layer(x).aux_losses) == {"expert_balance_loss", "device_balance_loss"}
    assert layer.config.num_experts == 8 and layer.config.num_shared_experts == 1


def _cfg(**kw):
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2)
    base = dict(vocab_size=31, d_model=32, n_layers=4, n_heads=4, max_seq_len=16, dense_ffn_hidden=24,
                moe_every=2, moe=moe)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(moe_experts_per_layer=[4]), r"moe_experts_per_layer must list one expert count per MoE layer \(2"),
    (dict(moe_experts_per_layer=[4, 0]), r"moe_experts_per_layer\[1\] must be a positive int"),
    (dict(moe_experts_per_layer=[4, 1]), r"moe_experts_per_layer\[1\]=1: .*top_k=2 exceeds"),
    (dict(first_dense_layers=-1), "first_dense_layers must be >= 0"),
    (dict(n_kv_heads=3), r"n_kv_heads \(3\) must be >= 1 and divide model.n_heads"),
    (dict(head_dim=0), "head_dim must be >= 1"),
    (dict(rope=True, head_dim=5), "rope needs an even head dim"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
    (dict(attention="flash"), "model.attention='flash' must be one of"),
    (dict(dense_activation="relu"), "model.dense_activation='relu'"),
    (dict(attention="moh", moh_shared_heads=4), r"moh_shared_heads \(4\) must be in \[0, n_heads=4\)"),
    (dict(attention="moh", moh_shared_heads=1, moh_top_k=4), r"moh_top_k \(4\) must be in \[1, 3\]"),
    (dict(attention="moh", moh_router="random"), "moh_router='random'"),
    (dict(moh_balance_coeff=-1.0), "moh_balance_coeff must be >= 0"),
    (dict(attention="bam", bam_attention_experts=0), "bam_attention_experts must be >= 1"),
])
def test_bad_zoo_config_raises_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        MoETransformer(_cfg(**kw))


def test_head_dim_may_differ_from_d_model_over_heads():
    model = MoETransformer(_cfg(n_heads=3, head_dim=16, rope=True))
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 3 * 16, 32)
    t = torch.randint(0, 31, (1, 5))
    assert model(t).logits.shape == (1, 5, 31)
