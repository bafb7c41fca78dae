"""benchmarks/attention.py runs at its smallest settings and reports every runner and target
(no timing is asserted: the machine is shared)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_attention_benchmark_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--seqs", "96", "--dims", "16",
                           "--window", "32", "--repeats", "1", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["cases"]) == {"S96_d16"}
    row = out["cases"]["S96_d16"]
    assert set(row) == {"sdpa", "flash", "moh75", "moh50", "window"}
    for r in row.values():
        assert r["time_s"] > 0 and r["peak_bytes"] > 0
    assert row["sdpa"]["speed_vs_sdpa"] == 1.0
    # MoH's FLOPs fall with the share of active heads
    flops = {name: r["attention_flops_fwd"] for name, r in row.items()}
    assert flops["moh50"] * 2 == flops["flash"] == flops["sdpa"] and flops["moh75"] * 4 == flops["flash"] * 3
    assert flops["window"] < flops["flash"]
    assert {k.split(":")[1] for k in out["targets"]} == {
        "flash_speed_vs_sdpa", "flash_peak_vs_sdpa_max", "moh75_speed_vs_sdpa", "moh50_speed_vs_sdpa",
        "window_speed_vs_flash"}
