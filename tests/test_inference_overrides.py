"""Routing overrides (hecate.moe.overrides): masked experts get no token and the layer equals one
with those experts removed; forced experts get every token; overrides stay inside their `with`."""
import pytest
import torch

from hecate.inference.prune import prune_layer
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe import MoEConfig, MoELayer
from hecate.moe.overrides import apply_mask_file, parse_routing, routing_overrides


def layer_of(router="topk", score_func="softmax", aux_free_bias=False, E=6, k=2, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=E, top_k=k, router=router,
                    score_func=score_func, aux_free_bias=aux_free_bias,
                    num_groups=2 if router == "group_limited" else 1, topk_groups=2 if router == "group_limited" else 1)
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight_ED.normal_()
        layer.router.expert_bias_E.normal_(std=0.3)
    return layer


@pytest.mark.parametrize("router,score_func,bias", [("topk", "softmax", False), ("topk", "sigmoid", True),
                                                     ("noisy_topk", "softmax", False)])
def test_disabled_experts_get_no_token_and_equal_a_pruned_layer(router, score_func, bias):
    layer = layer_of(router, score_func, bias)
    x = torch.randn(40, 16)
    disabled = [1, 4]
    with routing_overrides(layer, disabled=disabled):
        out = layer(x)
    load = out.stats.tokens_per_expert_E if hasattr(out.stats, "tokens_per_expert_E") else None
    with routing_overrides(layer, disabled=disabled):
        routing = layer.route(x, top_k=2, capacity_factor=None, group_sizes=[40])
    assert not torch.isin(routing.indices_TK, torch.tensor(disabled)).any()
    assert routing.tokens_per_expert_E[disabled].sum() == 0
    pruned = prune_layer(layer, [e for e in range(6) if e not in disabled])
    torch.testing.assert_close(out.y, pruned(x).y, rtol=1e-5, atol=1e-6)
    assert load is None or int(load[disabled].sum()) == 0
    # the override changes the result (the test would catch a no-op)
    assert not torch.allclose(layer(x).y, out.y)


def test_forced_experts_receive_every_token():
    layer = layer_of(k=3)
    x = torch.randn(50, 16)
    with routing_overrides(layer, forced=[0, 5]):
        r = layer.route(x, top_k=3, capacity_factor=None, group_sizes=[50])
        layer(x)
    assert r.indices_TK.shape == (50, 3)
    assert (r.indices_TK == 0).any(1).all() and (r.indices_TK == 5).any(1).all()
    assert int(r.tokens_per_expert_E[0]) == 50 and int(r.tokens_per_expert_E[5]) == 50
    # each row: distinct experts, the third is the token's best non-forced expert
    assert all(len(set(row.tolist())) == 3 for row in r.indices_TK)
    scores = r.scores_TE.clone()
    scores[:, [0, 5]] = -1
    assert torch.equal(r.indices_TK[:, 2], scores.argmax(1))
    torch.testing.assert_close(r.weights_TK.sum(1), torch.ones(50))


def test_ranks_top_k_and_temperature():
    layer = layer_of(k=2)
    x = torch.randn(30, 16)
    full = layer.route(x, top_k=4, capacity_factor=None, group_sizes=[30])
    with routing_overrides(layer, ranks=[2]):
        r2 = layer.route(x, top_k=2, capacity_factor=None, group_sizes=[30])
    assert torch.equal(r2.indices_TK[:, 0], full.indices_TK[:, 1])
    torch.testing.assert_close(r2.weights_TK, torch.ones(30, 1))
    with routing_overrides(layer, top_k=1):
        top1 = layer(x).y
    torch.testing.assert_close(top1, layer(x, top_k=1).y)
    assert not torch.allclose(top1, layer(x).y)
    with routing_overrides(layer, temperature=4.0):
        hot = layer.route(x, top_k=2, capacity_factor=None, group_sizes=[30])
    base = layer.route(x, top_k=2, capacity_factor=None, group_sizes=[30])
    torch.testing.assert_close(hot.scores_TE, torch.softmax(base.logits_TE / 4.0, -1))


def test_overrides_never_leak_also_on_exceptions_and_nest():
    torch.manual_seed(0)
    model = MoETransformer(TransformerConfig(n_layers=2, moe_every=1)).eval()
    x = torch.randint(0, 256, (2, 8))
    ref = model(x).logits
    with pytest.raises(RuntimeError, match="boom"):
        with routing_overrides(model, disabled={1: [0, 1]}):
            assert model.moe_layers()[1].router.override.disabled == (0, 1)
            assert model.moe_layers()[0].router.override is None
            raise RuntimeError("boom")
    assert all(layer.router.override is None for layer in model.moe_layers())
    torch.testing.assert_close(model(x).logits, ref)
    with routing_overrides(model, disabled=[0], temperature=2.0) as outer:
        with routing_overrides(model, disabled={0: [1]}, top_k=1) as inner:
            assert inner[0].disabled == (0, 1) and inner[0].top_k == 1 and inner[0].temperature == 2.0
            assert inner[1].disabled == (0,)
        assert model.moe_layers()[0].router.override == outer[0]
    assert all(layer.router.override is None for layer in model.moe_layers())


def test_bad_overrides_name_what_is_wrong():
    layer = layer_of(E=4, k=2)
    with pytest.raises(ValueError, match="top_k=2"):
        with routing_overrides(layer, disabled=[0, 1, 2]):
            pass
    with pytest.raises(ValueError, match=r"num_experts=4"):
        with routing_overrides(layer, disabled=[7]):
            pass
    with pytest.raises(ValueError, match="both disabled and forced"):
        with routing_overrides(layer, disabled=[1], forced=[1]):
            pass
    with pytest.raises(ValueError, match="MoE layers"):
        with routing_overrides(layer, disabled={3: [1]}):
            pass
    assert layer.router.override is None


def test_parse_routing_and_mask_union():
    kw = parse_routing("top_k=1,temperature=0.5,disable=3,disable=1:2,force=0,rank=2")
    assert kw["top_k"] == 1 and kw["temperature"] == 0.5 and kw["forced"] == [0] and kw["ranks"] == [2]
    assert kw["disabled"].get(1) == [2, 3] and kw["disabled"].get(0) == [3]
    merged = apply_mask_file({"disabled": [3]}, {"disabled": {"0": [1]}})["disabled"]
    assert merged.get(0) == [1, 3] and merged.get(1) == [3]
    with pytest.raises(ValueError, match="unknown"):
        parse_routing("topp=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_routing("top_k=x")
