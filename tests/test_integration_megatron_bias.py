"""Megatron's add_bias_linear=True (its default) and moe_shared_expert_gate against a real
Megatron-core MoE layer built on CPU; the Megatron adapter at two ranks on CPU."""
import pytest

from hecate.integrations.megatron import translate_megatron_args
from hecate.testing import run_distributed

ARGS = {"hidden_size": 16, "ffn_hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_moe_experts": 4,
        "moe_router_topk": 2}


def test_translation_of_megatron_defaults():
    m = translate_megatron_args(ARGS)[0]["moe"]  # add_bias_linear absent: Megatron's default True
    assert m["expert_bias"] is True
    m = translate_megatron_args(dict(ARGS, add_bias_linear=False, moe_shared_expert_intermediate_size=8,
                                     moe_shared_expert_gate=True, moe_router_topk_scaling_factor=2.5))[0]["moe"]
    assert "expert_bias" not in m and m["shared_expert_gate"] and m["routed_scaling_factor"] == 2.5
    with pytest.raises(ValueError, match="shared experts are bias-free"):
        translate_megatron_args(dict(ARGS, moe_shared_expert_intermediate_size=8))


@pytest.mark.parametrize("gated,gate_shared", [(False, False), (True, False), (True, True)])
def test_matches_a_real_megatron_layer(gated, gate_shared):
    pytest.importorskip("megatron.core", reason="megatron-core is optional (pip install -e .[megatron])")
    from tests import integration_cases as cases
    from tests.megatron_bias_cases import megatron_bias_layer

    (res,) = run_distributed(megatron_bias_layer, 1, gated, gate_shared, timeout=300, **cases.ISOLATED)
    assert res["same"], res
    assert res["expert_diff"] < 1e-5 and res["layer_diff"] < 1e-5, res
    if gate_shared:
        assert any("shared_gate" in k for k in res["keys"])
    else:
        assert any(k.endswith("experts.fc1__bias") for k in res["keys"])


@pytest.mark.parametrize("strategy,bias", [("fssdp", True), ("ep", False)])
def test_megatron_adapter_at_two_ranks_on_cpu(strategy, bias):
    pytest.importorskip("megatron.core", reason="megatron-core is optional (pip install -e .[megatron])")
    from tests import integration_cases as cases
    from tests.megatron_bias_cases import megatron_adapter_ranks

    res = run_distributed(megatron_adapter_ranks, 2, strategy, bias, timeout=300, **cases.ISOLATED)
    for r in res:
        assert r["y"] < 1e-5 and r["dx"] < 1e-5 and r["dexperts"] < 1e-5, r
        assert ("fc1__bias" in r["names"]) == bias, r
