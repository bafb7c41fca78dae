"""Smoke tests: each benchmark runs at its smallest settings and prints the documented JSON.

No timing is asserted (the machine is shared); only that the scripts run, report every
strategy / case, and that figures which follow from sizes alone are consistent.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_json(script, *args, timeout=240, env=None):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.mark.slow  # ten strategy runs on 2 ranks: ~30-50 s on a shared 2-core machine
def test_strategies_smoke():
    out, _ = run_json("strategies.py", "--nproc", "2", "--mem-nprocs", "--warmup", "0", "--steps", "1",
                      "--d-model", "16", "--ffn", "16", "--experts", "4", "--seq", "8", "--batch", "2",
                      "--vocab", "32", "--layers", "1", "--skew-scale", "0.5")
    world = out["worlds"]["2"]
    assert world["timed"] is True
    assert set(world["targets"]) >= {"fssdp_bytes_over_lower_bound", "fssdp_bytes_vs_fsdp",
                                     "ep_time_over_fssdp", "fssdp_rm_peak_vs_ep"}
    for routing in ("uniform", "skewed"):
        rows = world["routing"][routing]
        assert set(rows) == {"dp", "ep", "fsdp", "fssdp", "fssdp_bytes", "fssdp_no_rm"}
        for label, r in rows.items():
            assert r["step_time_s"] > 0 and r["peak_bytes_per_rank"] > 0
            assert r["expert_bytes"] > 0, label
            if label != "dp":
                # Moving only what is needed can never beat the lower bound.
                assert r["lower_bound_bytes"] is not None
                assert r["expert_bytes"] >= r["lower_bound_bytes"] * (1 - 1e-9), label
        # Every ratio is its row's own figure over the baseline row's, not a constant.
        for label, r in rows.items():
            assert r["time_vs_ep"] == pytest.approx(r["step_time_s"] / rows["ep"]["step_time_s"]), label
            assert r["peak_vs_ep"] == pytest.approx(r["peak_bytes_per_rank"] / rows["ep"]["peak_bytes_per_rank"])
            assert r["bytes_vs_fsdp"] == pytest.approx(r["expert_bytes"] / rows["fsdp"]["expert_bytes"]), label
        # Same model, same sizes: every strategy all-reduces the same dense gradients.
        assert len({r["dense_bytes"] for r in rows.values()}) == 1
        # The persistent state of fssdp and ep is 1/W of the experts, dp's is all of them.
        assert rows["dp"]["state_bytes_per_rank"] > rows["fssdp"]["state_bytes_per_rank"]
    assert world["routing"]["skewed"]["ep"]["imbalance"] > world["routing"]["uniform"]["ep"]["imbalance"]
    # The headline targets are read off the skewed rows: bytes off the byte-fitted plan
    # (fssdp_bytes), time and memory off fssdp's defaults.
    skewed, t = world["routing"]["skewed"], world["targets"]
    assert t["ep_time_over_fssdp"] == pytest.approx(skewed["ep"]["step_time_s"] / skewed["fssdp"]["step_time_s"])
    assert t["fssdp_bytes_vs_fsdp"] == pytest.approx(
        skewed["fssdp_bytes"]["expert_bytes"] / skewed["fsdp"]["expert_bytes"])
    assert t["fssdp_bytes_over_lower_bound"] == pytest.approx(
        skewed["fssdp_bytes"]["expert_bytes"] / skewed["fssdp_bytes"]["lower_bound_bytes"])
    assert t["fssdp_rm_peak_vs_ep"] == pytest.approx(
        skewed["fssdp"]["peak_bytes_per_rank"] / skewed["ep"]["peak_bytes_per_rank"])


def test_strategies_selected_paired_and_checkpointed():
    """--strategies / --routing pick the cases, --paired runs them in the same processes with
    steps alternating, --activation-checkpointing adds each case's checkpointed twin."""
    out, text = run_json("strategies.py", "--nproc", "2", "--mem-nprocs", "--warmup", "0", "--steps", "2",
                         "--d-model", "16", "--ffn", "16", "--experts", "4", "--seq", "8", "--batch", "2",
                         "--vocab", "32", "--layers", "1", "--skew-scale", "0.5", "--strategies", "ep", "fssdp",
                         "--routing", "skewed", "--paired", "--activation-checkpointing")
    world = out["worlds"]["2"]
    assert out["paired"] is True and set(world["routing"]) == {"skewed"}
    rows = world["routing"]["skewed"]
    assert set(rows) == {"ep", "fssdp"}
    ep, fssdp = rows["ep"], rows["fssdp"]
    assert fssdp["time_vs_ep"] == pytest.approx(fssdp["step_time_s"] / ep["step_time_s"])
    assert fssdp["bytes_vs_fsdp"] is None  # fsdp was not run
    assert len(fssdp["time_vs_ep_runs"]) == 1 and fssdp["step_cpu_s"] > 0
    assert fssdp["time_vs_ep_paired"] is None  # one repeat: no interval over repeats
    for r in rows.values():
        assert r["checkpointed"]["expert_bytes"] == r["expert_bytes"]  # recompute moves nothing more
        assert r["ckpt_peak_vs_off"] == pytest.approx(r["checkpointed"]["peak_bytes_per_rank"] / r["peak_bytes_per_rank"])
    # Tiny experts never repay their collectives at gloo's latency (fssdp's default): fssdp
    # takes ep's path.
    assert not any(n.startswith("fssdp.sp") for n in fssdp["bytes_by_collective"])
    for part in ("dispatch", "combine", "dispatch.backward", "combine.backward"):
        assert fssdp["bytes_by_collective"][f"fssdp.{part}"] == ep["bytes_by_collective"][f"ep.{part}"]
    # Only the selected rows' targets: skewed fssdp's time, no uniform row, no byte-fitted row.
    t = world["targets"]
    assert t["ep_time_over_fssdp"] == pytest.approx(ep["step_time_s"] / fssdp["step_time_s"])
    assert "uniform_fssdp_time_over_ep" not in t and "fssdp_bytes_over_lower_bound" not in t


def test_moe_layer_smoke_without_deepspeed():
    out, text = run_json("moe_layer.py", "--nproc", "2", "--no-deepspeed", "--warmup", "0", "--iters", "1",
                         "--d-model", "16", "--ffn", "16", "--experts", "4", "--tokens", "32")
    assert "DeepSpeed is NOT available" in text
    assert out["deepspeed"] is None and out["deepspeed_missing_reason"]
    assert set(out["cases"]) == {"top1_uniform", "top1_skewed", "top2_uniform", "top2_skewed"}
    for case in out["cases"].values():
        assert case["hecate"]["time_s"] > 0 and case["hecate"]["peak_bytes_per_rank"] > 0
        assert "deepspeed" not in case


def test_optimizer_smoke():
    out, _ = run_json("optimizer.py", "--steps", "1", "--warmup", "0", "--chunks", "2", "--chunk-numel", "1000",
                      "--dense", "3", "--dense-numel", "100")
    assert set(out["results"]) == {"single", "foreach", "fused"}
    assert out["elements"] == 2 * 2 * 1000 + 3 * 100
    for r in out["results"].values():
        assert r["step_ms"] > 0 and r["max_abs_diff_vs_single"] < 1e-5


def test_router_smoke():
    out, text = run_json("router.py", "--tokens", "64", "--experts", "8", "--k", "2", "--repeats", "1",
                         "--device", "cpu")
    assert set(out["ms"]) == {"fused", "recompute", "torch"} and all(v > 0 for v in out["ms"].values())
    assert out["recompute_over_fused"] == pytest.approx(out["ms"]["recompute"] / out["ms"]["fused"])
    assert out["torch_over_fused"] == pytest.approx(out["ms"]["torch"] / out["ms"]["fused"])
