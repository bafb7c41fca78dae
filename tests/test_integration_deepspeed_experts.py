"""Any expert nn.Module in the DeepSpeed drop-in: every form against DeepSpeed's own MoE
(outputs, l_aux, counts, every gradient) under the strategies (CPU, gloo)."""
import os

import pytest

from hecate.testing import run_distributed
from tests import ds_expert_cases as cases

pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install -e .[deepspeed])")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TOL = 2e-5

# (form, k, ep_size, drop_tokens, use_residual, tokens per rank, strategy, world, train)
SCENARIOS = [
    ("linear_bias_gelu", 1, 2, False, False, [6, 11], "fssdp", 2, True),   # the issue's own example
    ("linear_bias_gelu", 2, 2, True, True, [16, 16], "ep", 2, True),
    ("tanh_gelu_mixed_bias", 2, 2, False, False, [9, 5], "fsdp", 2, True),
    ("relu", 3, 2, True, False, [16, 16], "fssdp", 2, True),
    ("silu_dropout", 2, 2, False, False, [7, 12], "ep", 2, False),        # eval: dropout off
    ("swiglu", 1, 2, False, True, [10, 16], "fssdp", 2, True),      # (k=1 drops: test_deepspeed_rts)
    ("swiglu_bias", 2, 4, False, False, [4, 9, 6, 11], "fssdp", 4, True),
    ("geglu", 2, 2, False, True, [8, 3], "dp", 2, True),
    ("generic_norm", 2, 2, True, False, [16, 16], "fssdp", 2, True),
    ("generic_norm", 1, 4, False, True, [5, 8, 3, 10], "ep", 4, True),
]


@pytest.mark.parametrize("form,k,ep_size,drop,residual,tokens,strategy,world,train", SCENARIOS)
def test_expert_form_matches_deepspeed(form, k, ep_size, drop, residual, tokens, strategy, world, train):
    res = run_distributed(cases.ds_form_equivalence, world, form, k, ep_size, drop, residual, tokens, strategy,
                          train, timeout=300, **cases.ISOLATED)
    for r in res:
        assert r["counts_equal"], r
        assert r["mode"] == ("generic" if form.startswith("generic") else "grouped"), r
        for key in ("y", "l_aux", "dx", "dgate", "dexperts") + (("dresidual",) if residual else ()):
            assert r[key] <= TOL * max(1.0, r["scale"]), (key, r)


# DeepSpeed's random gate options, DeepSpeed's defaults included: (k, gate kwargs, drop_tokens,
# use_residual, tokens per rank, strategy, world, train)
DEFAULTS = {}  # use_rts=True, top2_2nd_expert_sampling=True, noisy_gate_policy=None
SAMPLING = [
    (1, DEFAULTS, True, False, [16, 16], "fssdp", 2, True),                    # RTS decides the drops
    (1, DEFAULTS, True, True, [24, 24], "ep", 2, False),                       # RTS in eval too
    (1, DEFAULTS, False, False, [9, 14], "fssdp", 2, True),                    # RTS drawn, nothing dropped
    (1, {"noisy_gate_policy": "RSample"}, True, False, [16, 16], "fsdp", 2, True),
    (1, {"noisy_gate_policy": "Jitter", "use_rts": True}, True, False, [16, 16], "fssdp", 2, True),
    (2, DEFAULTS, True, False, [16, 16], "fssdp", 2, True),                    # sampled 2nd expert
    (2, DEFAULTS, False, True, [7, 13], "ep", 2, False),                       # sampled in eval too
    (2, {"noisy_gate_policy": "Jitter"}, True, True, [16, 16, 16, 16], "fssdp", 4, True),
    (3, {"noisy_gate_policy": "Jitter"}, False, False, [5, 12], "dp", 2, True),
]


@pytest.mark.parametrize("k,gate_kw,drop,residual,tokens,strategy,world,train", SAMPLING)
def test_random_gate_options_draw_what_deepspeed_draws(k, gate_kw, drop, residual, tokens, strategy, world, train):
    res = run_distributed(cases.ds_sampling_equivalence, world, k, gate_kw, drop, residual, tokens, strategy,
                          train, timeout=300, **cases.ISOLATED)
    for r in res:
        assert r["counts_equal"], r
        for key in ("y", "l_aux", "dx", "dgate", "dexperts"):
            assert r[key] <= TOL * max(1.0, r["scale"]), (key, r)
    if drop and k == 1:
        assert sum(r["dropped"] for r in res) > 0, "the scenario should exercise random token selection"


@pytest.mark.parametrize("form,strategy", [("swiglu_bias", "fssdp"), ("geglu", "ep"), ("generic_norm", "fsdp"),
                                           ("relu", "fssdp")])
def test_any_expert_trains_under_every_strategy(form, strategy):
    """Engine training with the expert module's parameters sharded by the strategy equals dp."""
    res = run_distributed(cases.module_experts_training, 2, form, strategy, timeout=300, **cases.ISOLATED)
    for r in res:
        (l0, l1) = r["losses"]
        assert l0 == pytest.approx(l1, rel=1e-5, abs=1e-6), r
        assert r["diff"] < 1e-5 and r["moved"] > 1e-4, r
