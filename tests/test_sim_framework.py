"""The step model's framework terms (Hardware.framework_s): host seconds per MoE layer each
strategy's runtime spends beyond its modelled FLOPs, collectives and planning, calibrated by
hecate.sim.calibrate.framework_costs; and its count of collectives, which must be the calls
CommStats counts (hecate.sim.bytes, itself checked against gloo runs in test_sim_bytes.py)."""
import dataclasses

import numpy as np
import pytest

from hecate.parallel.fssdp.options import FssdpOptions
from hecate.sim.bytes import predict_ep, predict_fssdp
from hecate.sim.calibrate import FRAMEWORK_CASES, calibration_model_config, framework_costs
from hecate.sim.hardware import PRESETS, Hardware
from hecate.sim.report import synthetic_trace
from hecate.sim.shape import ModelShape, shape_of_config
from hecate.sim.step import StepSetup, simulate_steps

SHAPE = ModelShape(name="toy", d_model=512, n_layers=4, moe_layers=(0, 1, 2, 3), num_experts=16, top_k=2,
                   chunk_numel=2 * 512 * 1024, dense_params=20_000_000, matmul_params=12_000_000,
                   vocab_size=32000, seq_len=1024, attn_width=512)
HW = PRESETS["h100-ib400"]
TOKENS = 4096
# Pinned so that the plans do not depend on measured time: the same replicas in every replay.
FSSDP = {"overlap_degree": 2, "reshard_interval": 0, "bandwidth": (HW.bw_intra, HW.bw_inter),
         "token_compute_s": 1e-9}
if "collective_latency_s" in FssdpOptions.__dataclass_fields__:  # the byte fit's price of a collective
    FSSDP["collective_latency_s"] = HW.alpha_intra


def _simulate(hw, W=16, skew=1.2, layers=2, options=FSSDP, strategies=("ep", "fssdp"), warmup=3, steps=5):
    trace = synthetic_trace(layers, SHAPE.num_experts, TOKENS * SHAPE.top_k, W, steps, skew, 0.02)
    setup = StepSetup(SHAPE, hw, W, TOKENS, dict(options), count_planning=False)
    return simulate_steps(setup, trace, strategies, warmup=warmup), trace


def test_framework_term_is_charged_per_moe_layer_and_per_replicated_layer():
    fw = {"ep": [1e-3, 1e-7], "fssdp": [2e-3, 0.0], "fssdp.replicated": [5e-4, 0.0]}
    base, _ = _simulate(HW)
    with_fw, _ = _simulate(dataclasses.replace(HW, framework_s=fw))
    n_moe = len(SHAPE.moe_layers)
    ep = with_fw["ep"]["parts"]["framework"]
    assert ep == pytest.approx(n_moe * (1e-3 + 1e-7 * TOKENS))
    assert with_fw["fssdp"]["replicated_layers"] > 0  # skewed routing: replicas pay
    fssdp = with_fw["fssdp"]["parts"]["framework"]
    assert fssdp == pytest.approx(n_moe * 2e-3 + with_fw["fssdp"]["replicated_layers"] * 5e-4)
    for name in ("ep", "fssdp"):
        assert base[name]["parts"]["framework"] == 0.0
        assert with_fw[name]["calls"] == base[name]["calls"]
        assert with_fw[name]["seconds"] == pytest.approx(sum(with_fw[name]["parts"].values()), rel=1e-9)
    # ep has nothing to overlap: the term adds to its step as is
    assert with_fw["ep"]["seconds"] - base["ep"]["seconds"] == pytest.approx(ep, rel=1e-9)
    # fssdp's host time runs while its asynchronous gathers travel, so it hides part of them
    added = with_fw["fssdp"]["seconds"] - base["fssdp"]["seconds"]
    exposed = [k for k in base["fssdp"]["parts"] if k.startswith("exposed_")]
    hidden = sum(base["fssdp"]["parts"][k] - with_fw["fssdp"]["parts"].get(k, 0.0) for k in exposed)
    assert 0 < added <= fssdp + 1e-12
    assert added == pytest.approx(fssdp - hidden, rel=1e-9)


def test_replicated_term_is_zero_when_no_layer_holds_replicas():
    fw = {"fssdp": [2e-3, 0.0], "fssdp.replicated": [5e-4, 0.0]}
    no_replicas = {**FSSDP, "policy": "none", "fit_replicas": False}
    r, _ = _simulate(dataclasses.replace(HW, framework_s=fw), options=no_replicas,
                     strategies=("fssdp",))
    assert r["fssdp"]["replicated_layers"] == 0
    assert r["fssdp"]["parts"]["framework"] == pytest.approx(len(SHAPE.moe_layers) * 2e-3)
    # and without replicas fssdp issues exactly ep's collectives per layer plus its dense
    # optimizer's reduce-scatter + all-gather (ep: one all-reduce)
    ep, _ = _simulate(HW, strategies=("ep",))
    assert r["fssdp"]["calls"] == ep["ep"]["calls"] + 1


@pytest.mark.parametrize("skew", [0.2, 1.4])
def test_collectives_counted_like_commstats(skew):
    """Per step, the step model issues as many collectives as CommStats counts calls on a
    rank (predicted by hecate.sim.bytes with the same plans: more with replicas)."""
    W, rpn = 4, 4
    r, trace = _simulate(HW, W=W, skew=skew, layers=len(SHAPE.moe_layers), warmup=0, steps=3)
    rows = dict(d_model=SHAPE.d_model, dense_numel=SHAPE.dense_params, token_bytes_per_elem=HW.wire_bytes)
    ep = predict_ep(trace, rpn, **rows)[0]
    fssdp = predict_fssdp(trace, rpn, chunk_numel=SHAPE.chunk_numel, wire_bytes=HW.wire_bytes, **rows, **FSSDP)[0]
    assert r["ep"]["calls"] == pytest.approx(sum(v["calls"] for v in ep.values()) / len(trace))
    assert r["fssdp"]["calls"] == pytest.approx(sum(v["calls"] for v in fssdp.values()) / len(trace))
    if skew > 1:
        assert "fssdp.spAG" in fssdp and r["fssdp"]["calls"] > r["ep"]["calls"] + 1


def _fake_results(cfg, hw, tokens, want, steps=4):
    """strategy_steps_task-shaped results of 2 ranks whose measured steps are what the step
    model predicts with the framework terms `want` ({key: (fixed_s, per_token_s)})."""
    from hecate.sim.calibrate import local_excess_s

    shape = shape_of_config(cfg, "calibration")
    E, L = shape.num_experts, len(shape.moe_layers)
    rng = np.random.default_rng(tokens)
    counts = [[rng.multinomial(tokens * shape.top_k, np.full(E, 1.0 / E)).tolist() for _ in range(L)]
              for _ in range(steps)]
    local_s = 0.05 + 2e-6 * tokens
    true_hw = dataclasses.replace(hw, framework_s={k: list(v) for k, v in want.items()})
    times, out_counts = {"local": [local_s] * steps}, {"local": counts}
    for key, (name, options) in FRAMEWORK_CASES.items():
        if key == "local":
            continue
        setup = StepSetup(shape, true_hw, 2, tokens, dict(options) if name == "fssdp" else {},
                          overhead_s=local_excess_s(local_s, shape, hw, tokens), count_planning=False)
        trace = [[[counts[s][layer]] * 2 for layer in range(L)] for s in range(steps)]
        times[key] = [simulate_steps(setup, trace, (name,), warmup=0)[name]["seconds"]] * steps
        out_counts[key] = counts
    return [{"times": times, "counts": out_counts}] * 2


def test_framework_costs_recover_fixed_and_per_token_terms():
    cfg = calibration_model_config()
    hw = Hardware("t", 2, gemm_flops=3e10, adam_params_per_s=3e8, alpha_intra=5e-4, bw_intra=5e8,
                  alpha_inter=5e-4, bw_inter=5e8, wire_bytes=4)
    want = {"ep": (1e-3, 2e-6), "fssdp": (4e-3, 5e-6), "fssdp.replicated": (1.5e-3, 0.0)}
    results = {n: _fake_results(cfg, hw, n, want) for n in (16, 256)}
    got = framework_costs(results, cfg, hw, warmup=0, count_planning=False)["framework_s"]
    for key, (fixed, per_token) in want.items():
        assert got[key][0] == pytest.approx(fixed, rel=1e-6, abs=1e-9), key
        assert got[key][1] == pytest.approx(per_token, rel=1e-6, abs=1e-12), key


def test_hardware_rejects_bad_framework_terms():
    with pytest.raises(ValueError, match="unknown keys"):
        dataclasses.replace(HW, framework_s={"dp": [0.0, 0.0]})
    with pytest.raises(ValueError, match="fixed seconds, seconds per token"):
        dataclasses.replace(HW, framework_s={"ep": [-1.0, 0.0]})
    with pytest.raises(ValueError, match="fixed seconds, seconds per token"):
        dataclasses.replace(HW, framework_s={"ep": 1e-3})
