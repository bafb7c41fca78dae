"""benchmarks/planner.py runs, and on its own inputs the sparse planner's plans equal the dense
reference's (P1 and every route cell). Timings are printed by the benchmark, never asserted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_planner_benchmark_small_grid_matches_reference():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "planner.py"), "--ranks", "4", "16", "--experts", "8",
         "--top-k", "2", "--routing", "skewed", "--tokens-per-rank", "64", "--repeat", "1",
         "--ranks-per-node", "4", "--reference", "--json"],
        capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["same_plan_as_reference"] is True
        assert row["ms_min"] > 0 and row["peak_mib"] >= 0 and row["out_kib"] > 0
        assert row["same_plan_as_staged"] is True  # the fused runtime path and the staged one
        assert set(row["stages_ms"]) == {"plan", "bins", "sparse"}
        assert set(row["staged_stages_ms"]) == {"load", "p1", "fit", "routes", "splits", "bins", "sparse"}
    assert set(result["growth_exponent_in_W"]) == {"E=8 k=2 skewed"}
