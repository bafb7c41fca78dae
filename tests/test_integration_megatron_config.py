"""Megatron MoE argument translation: plain dicts, no Megatron import (runs in CI)."""
import argparse

import pytest

from hecate.integrations.megatron import megatron_moe_config, translate_megatron_args
from hecate.models.transformer import TransformerConfig

ARGS = {"hidden_size": 64, "ffn_hidden_size": 256, "moe_ffn_hidden_size": 96, "num_layers": 4,
        "num_attention_heads": 4, "num_moe_experts": 8, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2,
        "moe_z_loss_coeff": 1e-3, "moe_router_load_balancing_type": "aux_loss",
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
        "moe_expert_capacity_factor": 1.25, "moe_token_drop_policy": "probs",
        "moe_shared_expert_intermediate_size": 128, "expert_model_parallel_size": 2, "moe_grouped_gemm": True,
        "moe_layer_freq": 1, "add_bias_linear": False, "swiglu": True, "moe_token_dispatcher_type": "alltoall"}


def test_full_translation():
    s, notes = translate_megatron_args(ARGS)
    m = s["moe"]
    assert (m["hidden_size"], m["ffn_hidden_size"], m["num_experts"], m["top_k"]) == (64, 96, 8, 2)
    assert m["aux_loss_coeff"] == 1e-2 and m["z_loss_coeff"] == 1e-3 and m["score_func"] == "softmax"
    assert m["capacity_factor"] == 1.25 and m["drop_policy"] == "probability" and m["min_capacity"] == 0
    assert m["num_shared_experts"] == 1 and m["shared_expert_hidden_size"] == 128
    assert m["activation"] == "swiglu" and m["renormalize"] is True
    assert s["parallel"] == {"strategy": "ep", "ep_size": 2}
    assert s["model"]["moe_every"] == 1 and s["model"]["n_layers"] == 4
    assert any("moe_grouped_gemm" in n for n in notes)
    cfg = megatron_moe_config(argparse.Namespace(**ARGS))
    assert cfg.num_experts == 8 and cfg.num_shared_experts == 1
    s, notes = translate_megatron_args(ARGS, strategy="fssdp")
    assert s["parallel"] == {"strategy": "fssdp"} and any("expert_model_parallel_size" in n for n in notes)


@pytest.mark.parametrize("change,expect", [
    ({"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
      "moe_router_bias_update_rate": 1e-3}, {"score_func": "sigmoid", "aux_free_bias": True, "renormalize": True}),
    ({"moe_router_pre_softmax": True}, {"renormalize": False}),
    ({"moe_router_load_balancing_type": "seq_aux_loss"}, {"seq_aux_loss_coeff": 1e-2, "aux_loss_coeff": 0.0}),
    ({"moe_router_load_balancing_type": "none"}, {"aux_loss_coeff": 0.0}),
    ({"moe_expert_capacity_factor": None}, {"capacity_factor": None}),
    ({"moe_token_drop_policy": "position"}, {"drop_policy": "position"}),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk": 4},
     {"router": "group_limited", "num_groups": 4, "topk_groups": 2, "group_score": "top2_sum"}),
    ({"swiglu": False}, {"activation": "gelu"}),
])
def test_field_mappings(change, expect):
    a = dict(ARGS)
    a.update(change)
    m = translate_megatron_args(a)[0]["moe"]
    for key, v in expect.items():
        assert m.get(key, 0.0) == v, key


@pytest.mark.parametrize("freq,layers,pattern", [
    (1, 4, (1, 0)),
    ([0, 1, 0, 1], 4, (2, 0)),
    ([0, 0, 1, 1], 4, (1, 2)),
])
def test_layer_freq(freq, layers, pattern):
    a = dict(ARGS, moe_layer_freq=freq, num_layers=layers)
    model = translate_megatron_args(a)[0]["model"]
    assert (model["moe_every"], model["first_dense_layers"]) == pattern
    cfg = TransformerConfig(n_layers=layers, moe_every=pattern[0], first_dense_layers=pattern[1])
    want = [1] * layers if freq == 1 else freq
    assert [int(cfg.is_moe_layer(i)) for i in range(layers)] == want


def test_every_problem_in_one_error():
    bad = dict(ARGS, add_bias_linear=True, moe_router_load_balancing_type="sinkhorn",
               expert_tensor_parallel_size=2, tensor_model_parallel_size=2,
               moe_layer_freq=2, moe_input_jitter_eps=0.01, moe_token_drop_policy="random",
               moe_router_score_function="tanh", moe_new_thing=3)
    with pytest.raises(ValueError) as e:
        translate_megatron_args(bad)
    msg = str(e.value)
    # (add_bias_linear=True is refused here because ARGS has shared experts, which are bias-free)
    for key in ("add_bias_linear", "sinkhorn", "expert_tensor_parallel_size",
                "tensor_model_parallel_size", "moe_layer_freq=2", "moe_input_jitter_eps",
                "moe_token_drop_policy='random'", "moe_router_score_function='tanh'", "moe_new_thing"):
        assert key in msg, key


@pytest.mark.parametrize("change,key", [
    ({"num_moe_experts": None}, "num_moe_experts is not set"),
    ({"moe_router_topk": 9}, "top_k=9"),
    ({"moe_layer_freq": "([1]*4)"}, "evaluated list"),
    ({"moe_layer_freq": [1, 0]}, "has 2 entries"),
    ({"moe_router_num_groups": 4}, "set together"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1, "moe_router_topk": 4}, "top-4 sum"),
    ({"swiglu": False, "activation_func": "squared_relu"}, "activation_func=squared_relu"),
    ({"moe_aux_loss_coeff": [0.1, 0.2]}, "one value per"),
])
def test_errors_name_the_key(change, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace("[", r"\[").replace("*", r"\*")):
        translate_megatron_args(dict(ARGS, **change))


def test_bad_input_type():
    with pytest.raises(TypeError, match="args must be"):
        translate_megatron_args(42)
