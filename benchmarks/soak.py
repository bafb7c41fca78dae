"""Soak test (outside CI): a long fssdp demo run with re-sharding, a rank SIGKILLed every
`--kill-every` steps under `--max-restarts`, against an uninterrupted run side by side.

    .venv/bin/python benchmarks/soak.py [--steps 2000] [--kill-every 300] [--reshard-every 50]
                                        [--nproc 4] [--checkpoint-every 50] [--json]

Reports: resident memory (sum of the ranks' VmRSS, sampled every second) at the start, the
middle and the end of each restart segment; steps lost (logged steps missing from 1..steps)
and repeated (logged twice) in metrics.jsonl; and the loss of every step of the killed run
against the uninterrupted one (max |difference|, final losses). Both runs use the same
config, so with exact resume the losses are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def _steps(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r and "step" in r:
            rows.append((r["step"], r["loss"]))
    return rows


def run(args, out: Path, kill: bool) -> dict:
    cmd = [sys.executable, "-P", "-m", "hecate.cli", "train", "demo", "--nproc", str(args.nproc),
           "--max-restarts", str(args.steps // args.kill_every + 1 if kill else 0),
           "--set", f"train.out_dir={out}", "--set", f"train.steps={args.steps}", "--set", "train.log_every=1",
           "--set", f"train.eval_every={args.steps}", "--set", f"checkpoint.every={args.checkpoint_every}",
           "--set", "checkpoint.keep=2", "--set", f"parallel.fssdp.reshard_interval={args.reshard_every}",
           "--set", "sample.num_samples=0", "--set", "logging.heatmap=false", "--set", "logging.progress=false"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rng = random.Random(0)
    memory, kills, next_kill = [], [], args.kill_every
    t0 = time.time()
    while proc.poll() is None:
        time.sleep(1.0)
        ranks = _children(proc.pid)
        logged = _steps(out)
        step = logged[-1][0] if logged else 0
        if ranks:
            memory.append({"t": round(time.time() - t0, 1), "step": step, "rss_mb": round(_rss_mb(ranks), 1)})
        if kill and step >= next_kill and len(ranks) == args.nproc:
            victim = rng.choice(ranks)
            os.kill(victim, signal.SIGKILL)
            kills.append({"step": step, "pid": victim})
            next_kill += args.kill_every
    err = proc.stderr.read()
    logged = _steps(out)
    seen = [s for s, _ in logged]
    return {"exit_code": proc.returncode, "seconds": round(time.time() - t0, 1), "kills": kills,
            "restarts": err.count("restarting every rank"), "memory": memory,
            "steps_lost": sorted(set(range(1, args.steps + 1)) - set(seen)),
            "steps_repeated": sorted({s for s in seen if seen.count(s) > 1}),
            "losses": dict(logged), "stderr_tail": err[-2000:] if proc.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--kill-every", type=int, default=300)
    ap.add_argument("--reshard-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hecate-soak-") as tmp:
        killed = run(args, Path(tmp) / "killed", kill=True)
        straight = run(args, Path(tmp) / "straight", kill=False)
    common = sorted(set(killed["losses"]) & set(straight["losses"]))
    diff = max((abs(killed["losses"][s] - straight["losses"][s]) for s in common), default=None)
    mem = [m["rss_mb"] for m in killed["memory"]]
    report = {
        "config": vars(args),
        "killed_run": {k: v for k, v in killed.items() if k not in ("losses", "memory")},
        "uninterrupted_exit_code": straight["exit_code"], "uninterrupted_seconds": straight["seconds"],
        "steps_lost": len(killed["steps_lost"]), "steps_repeated": len(killed["steps_repeated"]),
        "final_loss_killed": killed["losses"].get(args.steps), "final_loss_uninterrupted": straight["losses"].get(args.steps),
        "max_abs_loss_difference": diff,
        "rss_mb": {"first": mem[0] if mem else None, "max": max(mem) if mem else None,
                   "last": mem[-1] if mem else None, "samples": len(mem)},
        "memory_over_time": killed["memory"][:: max(1, len(killed["memory"]) // 40)],
    }
    if args.json:
        print(json.dumps(report))
        return
    print(json.dumps({k: v for k, v in report.items() if k != "memory_over_time"}, indent=1))
    print("memory over time (killed run): step -> MB")
    for m in report["memory_over_time"]:
        print(f"  t={m['t']:>7}s step {m['step']:>5}: {m['rss_mb']:8.1f} MB")


if __name__ == "__main__":
    main()
