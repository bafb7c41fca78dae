"""A real two-node launch on localhost: launch/torchrun_multi_node.sh started twice (node ranks
0 and 1, one rank each) with a c10d rendezvous on 127.0.0.1 trains configs/tiny_fssdp.yaml for
a few steps; the run spans 2 nodes (checkpoint manifest: 1 rank per node), its losses equal
those of the same config trained as 2 ranks of one node, and the routing trace it recorded
(logging.trace) replays through `hecate simulate --trace`."""
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from hecate.testing import run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
TIMEOUT = 240  # seconds for the whole two-node run (torch import + rendezvous + 3 tiny steps)


def _overrides(out_dir: Path) -> list[str]:
    sets = [f"train.steps={STEPS}", f"train.eval_every={STEPS}", "train.eval_batches=1", "train.log_every=1",
            "logging.progress=false", "logging.heatmap=false", f"checkpoint.every={STEPS}",
            f"train.out_dir={out_dir}"]
    return sum((["--set", s] for s in sets), [])


def _losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_one_node(rank, world, out_dir):
    """Reference: the same config as 2 ranks of one node (the pool's process group)."""
    from hecate.train.config import load_config
    from hecate.train.trainer import train

    os.environ.pop("LOCAL_WORLD_SIZE", None)
    args = _overrides(Path(out_dir))
    cfg = load_config(str(REPO / "configs" / "tiny_fssdp.yaml"), args[1::2], world_size=world)
    train(cfg)


def test_two_torchrun_nodes_on_localhost_train_like_one_node(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out2 = tmp_path / "two_nodes"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NNODES": "2",
           "NPROC": "1", "RDZV_ID": f"test-{uuid.uuid4().hex[:8]}", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("LOCAL_WORLD_SIZE", None)
    trace = out2 / "trace.jsonl"
    cmd = ["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), "configs/tiny_fssdp.yaml", *_overrides(out2),
           "--set", f"logging.trace={trace}"]
    nodes = [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(n)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for proc in nodes:
            proc.kill()
        pytest.fail(f"the two-node run did not finish within {TIMEOUT}s")
    for n, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {n} failed:\n{out[-3000:]}"
    manifest = json.loads(next(out2.glob("checkpoints/step_*/manifest.json")).read_text())
    assert manifest["world_size"] == 2 and manifest["ranks_per_node"] == 1  # two nodes of one rank

    out1 = tmp_path / "one_node"
    run_distributed(train_one_node, 2, str(out1), timeout=TIMEOUT)
    losses2, losses1 = _losses(out2), _losses(out1)
    assert len(losses2) == STEPS and len(losses1) == STEPS
    torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses1), rtol=1e-4, atol=1e-5)

    # The run's routing trace replays through the simulator (2 nodes of 1 rank, 3 steps).
    from hecate.cli import main

    assert main(["simulate", "--trace", str(trace), "--config", "configs/tiny_fssdp.yaml", "--warmup", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (r,) = out["results"]
    assert r["num_ranks"] == 2 and r["ranks_per_node"] == 1 and set(r["seconds_per_step"]) == {"ep", "fsdp", "fssdp"}
