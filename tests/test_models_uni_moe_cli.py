"""`hecate train configs/models/tiny-uni-moe.yaml`: the staged Uni-MoE schedule through the CLI
and launcher (hecate.train.stages.train_stages on every worker). Checks the stage order, the
exit code, and, from the per-stage snapshots, that each stage changed its own parameters only;
at 2 ranks through a rank's failure, the launcher's restart and the resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hecate.models.registry import build_model
from hecate.train.checkpoint import verify_checkpoint
from hecate.train.stages import load_stage_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/models/tiny-uni-moe.yaml"
ORDER = ["align", "experts", "lora"]


def _hecate(*args, timeout=240, **env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "hecate.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ep at 2 ranks: rank 1 dies after step 2 (inside the experts stage); the launcher restarts both
# ranks, which resume from the step-2 checkpoint (checkpoint.every=1) and finish the schedule.
@pytest.mark.parametrize("strategy,nproc,fault", [("local", 1, None), ("ep", 2, "raise:1:3")])
def test_cli_runs_the_stages_in_order_and_freezes_the_rest(tmp_path, strategy, nproc, fault):
    out = tmp_path / "run"
    r = _hecate("train", CONFIG, "--nproc", str(nproc), "--set", f"parallel.strategy={strategy}",
                "--set", "stages.steps=1", "--set", "stages.experts.steps=2", "--set", f"train.out_dir={out}",
                *(["--max-restarts", "1", "--set", "checkpoint.every=1"] if fault else []),
                **({"HECATE_FAULT": fault} if fault else {}))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stages align -> experts -> lora: 4 steps" in r.stdout, r.stdout
    if fault:
        assert "restarting every rank from the newest checkpoint" in r.stderr, r.stderr
        assert "(resumed after step 2)" in r.stdout, r.stdout

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["stage"]) for m in metrics] == [(1, "align"), (2, "experts"), (3, "experts"), (4, "lora")]
    stages = json.loads((out / "stages.json").read_text())
    assert [s["name"] for s in stages] == ORDER
    assert verify_checkpoint(out / "checkpoints") == 4  # the final checkpoint, verified

    # The initial weights: the config's seed, built as train_stages builds them.
    cfg = load_stage_config(CONFIG)
    torch.manual_seed(cfg.seed)
    model = build_model("uni_moe", cfg.model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for s in stages:
        assert set(s["trainable"]) == set(model.stage_parameters(s["name"]))
        now = safetensors.torch.load_file(s["snapshot"])
        assert set(now) == set(before)
        frozen = [n for n in now if n not in s["trainable"]]
        changed_frozen = [n for n in frozen if not torch.equal(now[n], before[n])]
        assert not changed_frozen, (s["name"], changed_frozen[:5])
        assert any(not torch.equal(now[n], before[n]) for n in s["trainable"]), s["name"]
        before = now


def test_cli_staged_config_errors(tmp_path, capsys):
    from hecate.cli import main

    out = f"train.out_dir={tmp_path}/run"
    assert main(["train", CONFIG, "--nproc", "2", "--set", out]) == 2
    assert "parallel.strategy=local runs on 1 rank, got 2" in capsys.readouterr().err
    assert main(["train", CONFIG, "--set", "stages.pretrain.steps=1", "--set", out]) == 2
    assert "no stage 'pretrain'; stages are ['align', 'experts', 'lora']" in capsys.readouterr().err
    assert main(["train", CONFIG, "--set", "train.steps=3", "--set", out]) == 2
    assert "unknown keys ['steps'] in train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any worker started
    assert main(["train", CONFIG, "--resume", "--set", out]) == 2  # the preflight
    assert "--resume: no checkpoints under" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
