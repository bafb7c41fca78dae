"""The step model (hecate.sim.step) on small synthetic cases: alpha-beta costs per link class,
fssdp's overlap, and the strategies' orderings under skew that the model must reproduce."""
import dataclasses

import numpy as np
import pytest

from hecate.sim.hardware import PRESETS, Hardware
from hecate.sim.plans import Traffic
from hecate.sim.report import synthetic_trace
from hecate.sim.shape import ModelShape
from hecate.sim.step import StepSetup, phase_time, simulate_steps

SHAPE = ModelShape(name="toy", d_model=512, n_layers=4, moe_layers=(0, 1, 2, 3), num_experts=16, top_k=2,
                   chunk_numel=2 * 512 * 1024, dense_params=20_000_000, matmul_params=12_000_000,
                   vocab_size=32000, seq_len=1024, attn_width=512)
HW = PRESETS["h100-ib400"]


def test_phase_time_charges_each_link_class_at_its_bandwidth():
    hw = Hardware("t", 2, gemm_flops=1e12, adam_params_per_s=1e9, alpha_intra=1e-3, bw_intra=100.0,
                  alpha_inter=2e-3, bw_inter=10.0)
    t = Traffic(np.array([100.0, 0.0]), np.array([10.0, 0.0]), np.array([0.0, 300.0]), np.array([0.0, 0.0]))
    # rank 0 sends 100 B intra (1 s) + 10 B inter (1 s); rank 1 receives 300 B intra (3 s)
    assert phase_time(t, hw, multi_node=False) == pytest.approx(1e-3 + 3.0)
    assert phase_time(t, hw, multi_node=True) == pytest.approx(2e-3 + 3.0)


def _run(W, skew, strategies=("ep", "fsdp", "fssdp"), hw=HW, **setup):
    trace = synthetic_trace(2, SHAPE.num_experts, 4096 * SHAPE.top_k, W, 5, skew, 0.02)
    # planning time off: it is measured on this host, so it would make the test depend on load
    return simulate_steps(StepSetup(SHAPE, hw, W, 4096, count_planning=False, **setup), trace, strategies, warmup=3)


def test_skew_slows_ep_and_replication_helps_fssdp():
    mild, hot = _run(16, 0.2), _run(16, 1.4)
    assert hot["ep"]["seconds"] > mild["ep"]["seconds"]
    # under heavy skew fssdp replicates the hot experts and beats ep
    assert hot["fssdp"]["seconds"] < hot["ep"]["seconds"]
    for r in (mild, hot):
        for name, v in r.items():
            assert v["seconds"] == pytest.approx(sum(v["parts"].values()), rel=1e-9), name


def test_hybrid_keeps_tokens_in_the_node():
    r = _run(32, 1.2, strategies=("fssdp", "fssdp_hybrid"), hybrid_group=8)
    assert "replica_all_reduce" in r["fssdp_hybrid"]["parts"]
    # tokens cross NVLink only: its all-to-alls are faster than flat fssdp's across nodes
    assert r["fssdp_hybrid"]["parts"]["all_to_all"] < r["fssdp"]["parts"]["all_to_all"]


def test_slow_links_make_every_exchange_slower():
    fast = _run(16, 1.2)
    slow = _run(16, 1.2, hw=dataclasses.replace(HW, bw_inter=HW.bw_inter / 10))
    for name in ("ep", "fsdp", "fssdp"):
        assert slow[name]["seconds"] > fast[name]["seconds"]
