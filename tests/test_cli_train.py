"""`hecate inspect` numbers and a 2-rank end-to-end `hecate train` through the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hecate(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hecate.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _main(capsys, *args):
    """Run the CLI in-process (fast); returns (exit code, stdout, stderr)."""
    from hecate.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_json_matches_hand_count(capsys):
    code, stdout, _ = _main(capsys, "inspect", "tiny_dp", "--json")
    assert code == 0
    info = json.loads(stdout)
    V, D, L, S, H, E, F, K = 256, 32, 2, 64, 64, 4, 32, 2  # configs/tiny_dp.yaml
    per_layer = 2 * D + 3 * D * D + D * D + D * E   # 2 norms, qkv, out, router
    routed = L * E * 2 * D * F                       # w1 [E,F,D] + w2 [E,D,F] per MoE layer
    dense = V * D + S * D + D + L * per_layer        # tied embedding, positions, final norm
    assert info["total_params"] == dense + routed
    assert info["active_params"] == dense + routed * K // E
    assert info["memory_per_rank"]["world_size"] == 2


def test_inspect_human_and_errors(capsys):
    code, stdout, _ = _main(capsys, "inspect", "demo", "--nproc", "4")
    assert code == 0 and "active params/token" in stdout
    code, _, stderr = _main(capsys, "inspect", "tiny_ep", "--nproc", "3")
    assert code == 2 and "parallel.ep_size=2 must divide the world size 3" in stderr
    code, _, stderr = _main(capsys, "inspect", "tiny_ep", "--nproc", "0")
    assert code == 2 and "--nproc=0 must be >= 1" in stderr


def test_train_rejects_layout_before_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    import hecate.train.launch

    launched = []
    monkeypatch.setattr(hecate.train.launch, "launch",
                        lambda spec: launched.append((spec.nproc, spec.worker_args)) or 0)
    code, _, stderr = _main(capsys, "train", "tiny_ep", "--nproc", "3", "--set", f"train.out_dir={tmp_path}/run")
    assert code == 2 and "parallel.ep_size" in stderr and not launched
    code, _, stderr = _main(capsys, "train", "tiny_dp", "--set", "optim.lrr=1")
    assert code == 2 and "did you mean optim.lr?" in stderr and not launched
    code, _, stderr = _main(capsys, "train", "tiny_dp", "--nproc", "0")
    assert code == 2 and "--nproc=0 must be >= 1" in stderr and not launched
    out = f"train.out_dir={tmp_path}/ok"
    code, _, _ = _main(capsys, "train", "tiny_ep", "--nproc", "4", "--set", "optim.lr=1e-3", "--set", out)
    assert code == 0 and launched == [(4, ["tiny_ep", "--set", "optim.lr=1e-3", "--set", out])]


def test_two_rank_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = _hecate("train", "tiny_fssdp", "--nproc", "2", "--set", "train.steps=3", "--set", "train.log_every=1",
                "--set", f"train.out_dir={out}", "--set", f"data.cache_dir={tmp_path}/cache",
                "--set", "data.embedded_max_bytes=100000", "--set", "sample.num_samples=1",
                "--set", "sample.max_new_tokens=4", "--set", "logging.heatmap=false")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "loss" in rec]
    assert [rec["step"] for rec in steps] == [1, 2, 3]
    assert all(math.isfinite(rec["loss"]) and rec["loss"] > 0 for rec in steps)
    assert all(len(rec["expert_load"]) == 2 and len(rec["expert_load"][0]) == 4 for rec in steps)
    # each step's load sums the routed entries of both ranks: 2 ranks * 4 seqs * 32 tokens * top-2
    assert sum(steps[0]["expert_load"][0]) == 2 * 4 * 32 * 2
    evals = [rec for rec in records if "val_loss" in rec]
    assert evals and math.isfinite(evals[-1]["val_ppl"])
    assert "strategy: fssdp" in (out / "config.yaml").read_text()
    assert "--- sample 0 ---" in r.stdout and (out / "samples.txt").exists()
