"""MoELayer + LocalStrategy against a naive per-token oracle, and the layer's contracts."""
import math

import pytest
import torch
import torch.nn.functional as F

from hecate.moe import MoEConfig, MoELayer
from hecate.ops import reference
from hecate.parallel.local import LocalStrategy


def make_layer(seed=0, **kw):
    base = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, min_capacity=0)
    base.update(kw)
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(**base))


def expert(layer, e, x_D):
    ex = layer.experts
    h = x_D @ ex.w1_EFD[e].t()
    if ex.activation == "swiglu":
        h = F.silu(h) * (x_D @ ex.w3_EFD[e].t())
    else:
        h = F.gelu(h)
    return h @ ex.w2_EDF[e].t()


def oracle(layer, x_TD, k, capacity_factor, renormalize=True):
    """Independent routing (softmax, stable top-k, GShard/probability capacity via the ops
    reference) and a per-token loop: y[t] = sum_k w[t,k] * expert_{i[t,k]}(x[t])."""
    c = layer.config
    probs = torch.softmax(x_TD.float() @ layer.router.weight_ED.t(), -1)
    idx = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    w = probs.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if capacity_factor is not None:
        cap = max(c.min_capacity, math.ceil(round(capacity_factor * x_TD.shape[0] * k / c.num_experts, 9)))
        prio = None if c.drop_policy == "position" else w.detach()
        _, row_map, _ = reference.permute(x_TD.detach(), idx, c.num_experts, cap, prio)
        keep = row_map >= 0
    else:
        keep = torch.ones_like(idx, dtype=torch.bool)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for j in range(k):
            if keep[t, j]:
                acc = acc + w[t, j] * expert(layer, int(idx[t, j]), x_TD[t])
        rows.append(acc)
    return torch.stack(rows) if rows else x_TD * 0


def params(layer):
    ps = [layer.router.weight_ED, layer.experts.w1_EFD, layer.experts.w2_EDF]
    return ps + ([layer.experts.w3_EFD] if layer.experts.w3_EFD is not None else [])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity_factor,policy", [(None, "position"), (0.75, "position"),
                                                    (0.75, "probability")])
def test_local_matches_naive_oracle_with_grads(activation, k, capacity_factor, policy):
    layer = make_layer(activation=activation, top_k=k, capacity_factor=capacity_factor,
                       drop_policy=policy)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, requires_grad=True)
    out = layer(x)
    assert out.y.shape == x.shape
    g = torch.randn_like(out.y)
    got = torch.autograd.grad(out.y, [x] + params(layer), g)
    x_TD = x.reshape(-1, 8)
    ref_y = oracle(layer, x_TD, k, capacity_factor)
    ref = torch.autograd.grad(ref_y, [x] + params(layer), g.reshape(-1, 8))
    assert torch.allclose(out.y.reshape(-1, 8), ref_y, atol=1e-5)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-5)
    if capacity_factor is not None:
        assert out.stats.dropped_fraction > 0  # the case really drops


def test_default_strategy_is_local():
    assert isinstance(make_layer().strategy, LocalStrategy)


def test_shared_experts_see_every_token():
    layer = make_layer(num_shared_experts=2, shared_expert_hidden_size=4, capacity_factor=0.25)
    with torch.no_grad():
        layer.experts.w2_EDF.zero_()  # routed experts contribute nothing
    x = torch.randn(10, 8)
    out = layer(x)
    assert torch.allclose(out.y, layer.shared_experts(x), atol=1e-6)
    assert (out.y.abs().sum(-1) > 0).all()
    assert out.stats.dropped_fraction > 0  # even dropped tokens get the shared output
    assert layer.shared_experts.w1_FD.shape == (8, 8)


def test_residual_moe_mixes_moe_and_dense_mlp():
    layer = make_layer(use_residual=True)
    x = torch.randn(6, 8, requires_grad=True)
    out = layer(x)
    routing = layer.route(x, top_k=2, capacity_factor=None, group_sizes=[6])
    moe = LocalStrategy().forward(layer, x, routing)
    coef = torch.softmax(layer.residual.coefficient(x), -1)
    assert torch.allclose(out.y, moe * coef[:, :1] + layer.residual.mlp(x) * coef[:, 1:], atol=1e-6)
    out.y.sum().backward()
    assert layer.residual.coefficient.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_zero_token_input(shape):
    layer = make_layer(aux_loss_coeff=0.1, z_loss_coeff=0.1, seq_aux_loss_coeff=0.1,
                       capacity_factor=1.0, num_shared_experts=1)
    x = torch.zeros(shape, requires_grad=True)
    out = layer(x)
    assert out.y.shape == shape and out.aux_loss.item() == 0.0
    (out.y.sum() + out.aux_loss).backward()
    assert out.stats.tokens_per_expert_E.tolist() == [0, 0, 0, 0]
    assert out.stats.imbalance == 1.0 and out.stats.dropped_fraction == 0.0


@pytest.mark.parametrize("router,extra", [
    ("topk", {}), ("switch", {"top_k": 1}), ("noisy_topk", {}), ("expert_choice", {"aux_loss_coeff": 0.0,
                                                                                  "seq_aux_loss_coeff": 0.0}),
    ("group_limited", {"num_groups": 2, "topk_groups": 1, "score_func": "sigmoid"}),
])
def test_group_sizes_equal_running_each_group_alone(router, extra):
    kw = dict(router=router, capacity_factor=1.0, aux_loss_coeff=0.01, z_loss_coeff=0.001,
              seq_aux_loss_coeff=0.02)
    kw.update(extra)
    layer = make_layer(**kw).eval()
    layer.config.eval_capacity_factor = 1.0
    torch.manual_seed(2)
    x = torch.randn(12, 8)
    sizes = [5, 0, 7]
    whole = layer(x, group_sizes=sizes)
    parts = [layer(x[:5]), layer(x[5:5]), layer(x[5:])]
    assert torch.allclose(whole.y, torch.cat([p.y for p in parts]), atol=1e-6)
    for name, value in whole.aux_losses.items():
        mean = sum(p.aux_losses[name] for p in parts) / 3
        assert torch.allclose(value, mean, atol=1e-7), name
    assert torch.equal(whole.stats.tokens_per_expert_E, sum(p.stats.tokens_per_expert_E for p in parts))


def test_group_sizes_must_hold_whole_sequences():
    layer = make_layer(seq_aux_loss_coeff=0.1)
    with pytest.raises(ValueError, match="group_sizes"):
        layer(torch.randn(2, 3, 8), group_sizes=[2, 4])
    with pytest.raises(ValueError, match="group_sizes"):
        layer(torch.randn(6, 8), group_sizes=[2, 3])


def test_eval_mode_uses_eval_capacity_factor():
    layer = make_layer(capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(16, 8)
    assert layer.train()(x).stats.dropped_fraction > 0
    assert layer.eval()(x).stats.dropped_fraction == 0
    layer.config.eval_capacity_factor = 0.25
    assert layer(x).stats.dropped_fraction >= 0.5


def test_per_call_overrides():
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(16, 8)
    assert layer(x, capacity_factor=math.inf).stats.dropped_fraction == 0
    out = layer(x, top_k=1, capacity_factor=4.0)
    assert out.stats.tokens_per_expert_E.sum() == 16 and out.stats.dropped_fraction == 0
    with pytest.raises(ValueError, match="top_k"):
        layer(x, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(x, capacity_factor=0.0)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, 7))


def test_stats_and_aux_loss_sum():
    layer = make_layer(aux_loss_coeff=0.1, z_loss_coeff=0.01, expert_balance_coeff=0.2,
                       device_balance_coeff=0.3, num_devices=2, capacity_factor=0.5)
    out = layer(torch.randn(20, 8))
    assert set(out.aux_losses) == {"aux_loss", "z_loss", "expert_balance_loss", "device_balance_loss"}
    assert torch.allclose(out.aux_loss, sum(out.aux_losses.values()))
    st = out.stats
    load = st.tokens_per_expert_E.float()
    assert st.tokens_per_expert_E.sum() == 40
    assert st.imbalance == pytest.approx(float(load.max() / load.mean()))
    assert st.dropped_fraction == pytest.approx(1 - st.kept_per_expert_E.sum().item() / 40)
    assert st.kept_per_expert_E.max() <= 5  # capacity ceil(0.5 * 20 * 2 / 4)
    d = st.to_dict("moe0/")
    assert d["moe0/aux_loss"] == pytest.approx(out.aux_losses["aux_loss"].item())
    assert "moe0/imbalance" in d and "moe0/dropped_fraction" in d


def test_layer_update_bias_uses_accumulated_load():
    layer = make_layer(aux_free_bias=True, bias_update_rate=0.1, top_k=1)
    x = torch.randn(32, 8)
    load = layer(x).stats.tokens_per_expert_E + layer(x).stats.tokens_per_expert_E
    assert torch.equal(layer.load_since_update_E, load)
    layer.update_bias()
    expected = 0.1 * torch.sign(load.float().mean() - load.float())
    assert torch.allclose(layer.router.expert_bias_E, expected)
    assert layer.load_since_update_E.sum() == 0
    with pytest.raises(ValueError, match="aux_free_bias"):
        make_layer().update_bias()


def test_bf16_layer_keeps_fp32_routing():
    layer = make_layer(activation="swiglu").to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.y.dtype == torch.bfloat16
    routing = layer.route(x.reshape(-1, 8), top_k=2, capacity_factor=None, group_sizes=[10])
    assert routing.weights_TK.dtype == torch.float32


@pytest.mark.parametrize("kw,field", [
    (dict(top_k=5), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(num_experts=0), "num_experts"),
    (dict(router="nope"), "router"),
    (dict(score_func="tanh"), "score_func"),
    (dict(activation="relu"), "activation"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(group_score="mean"), "group_score"),
    (dict(num_groups=3), "num_groups"),
    (dict(num_groups=2, topk_groups=3), "topk_groups"),
    (dict(router="group_limited", num_groups=4, topk_groups=1), "topk_groups"),
    (dict(num_devices=3), "num_devices"),
    (dict(router="switch"), "top_k"),
    (dict(jitter_eps=1.5), "jitter_eps"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(aux_loss_coeff=-0.1), "aux_loss_coeff"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(shared_expert_hidden_size=0), "shared_expert_hidden_size"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(router="expert_choice", aux_loss_coeff=0.1), "aux_loss_coeff"),
])
def test_bad_config_names_the_field(kw, field):
    base = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        MoEConfig(**base).validate()
    with pytest.raises(ValueError, match=field):
        MoELayer(MoEConfig(**base))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 9), e=st.integers(1, 5), k=st.integers(1, 3), cf=st.sampled_from([None, 0.5, 1.0]),
       policy=st.sampled_from(["position", "probability"]), act=st.sampled_from(["gelu", "swiglu"]),
       seed=st.integers(0, 99))
def test_local_matches_oracle_property(t, e, k, cf, policy, act, seed):
    k = min(k, e)
    layer = make_layer(seed=seed, num_experts=e, top_k=k, capacity_factor=cf, drop_policy=policy,
                       activation=act)
    x = torch.randn(t, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.allclose(layer(x).y, oracle(layer, x, k, cf), atol=1e-5)


def test_explicit_seq_len_for_flat_input():
    layer = make_layer(seq_aux_loss_coeff=1.0)
    x = torch.randn(2, 3, 8)
    a = layer(x).aux_losses["seq_aux_loss"]
    b = layer(x.reshape(6, 8), seq_len=3).aux_losses["seq_aux_loss"]
    assert torch.allclose(a, b)
    assert not torch.allclose(a, layer(x.reshape(6, 8)).aux_losses["seq_aux_loss"])
    with pytest.raises(ValueError, match="seq_len"):
        layer(x.reshape(6, 8), seq_len=4)
