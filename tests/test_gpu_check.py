"""tools/gpu_check.sh --dry-run: the first-GPU-run script runs end to end on a CPU machine
(CPU build, gpu tests collected and skipped, collectives / FSSDP steps on gloo, the kernel
benchmarks at tiny shapes) and writes its one JSON file, so it cannot rot before a GPU run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["ok"] is True
    assert set(results["steps"]) == {"build", "pytest_gpu", "gpu_check", "collectives", "fssdp_step", "bench"}
    assert all(step["ok"] for step in results["steps"].values())
    # Every step's whole log beside the JSON; the gpu tests of every module were collected.
    pytest_log = (tmp_path / "gpu_check_pytest_gpu.log").read_text()
    assert (tmp_path / "gpu_check_build.log").exists() and (tmp_path / "gpu_check_gpu_check.log").exists()
    for module in ("test_cuda_kernels.py", "test_ops_attention_cuda.py", "gpu/test_gpu_path.py"):
        assert module in pytest_log, pytest_log[-2000:]  # -ra lists each module's skips
    fssdp = results["steps"]["fssdp_step"]
    assert fssdp["fp32"]["max_abs_diff"] <= 1e-4 and len(fssdp["bf16_autocast"]["losses"]) == 2
    bench = results["bench"]
    for key in ("permute_float32", "permute_bfloat16", "unpermute_float32", "gating", "pack_chunks",
                "unpack_chunks", "scatter_add_chunks", "attention"):
        assert bench[key]["hecate_s"] > 0 and bench[key]["torch_s"] > 0, key
    gemm = bench["grouped_gemm"]
    assert gemm["auto_tflops"] > 0 and gemm["peak_tflops"] > 0 and gemm["auto_fraction_of_peak"] > 0


def test_gpu_check_refuses_unknown_arguments():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


CRASH = r"""
import os, sys
sys.path.insert(0, "tools")
import gpu_check
gpu_check.collectives = lambda device, backend, quick: {"chunks": 1}
gpu_check.bench = lambda device, quick: os._exit(7)  # the process dies inside a step (a segfault)
gpu_check.main(["--dry-run", "--steps", "collectives,bench", "--out", sys.argv[1]])
"""


def test_a_crash_inside_a_step_keeps_the_steps_before_it(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 7, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["steps"]["collectives"]["ok"] and results["steps"]["collectives"]["chunks"] == 1
    assert not results["steps"]["bench"]["ok"] and "did not finish" in results["steps"]["bench"]["error"]
    assert results["ok"] is False
