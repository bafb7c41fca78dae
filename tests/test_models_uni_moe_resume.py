"""Staged runs (Uni-MoE) resume from the stage and step where they stopped: the newest checkpoint
and every finished stage's snapshot are verified, the config must still describe the run, and the
resumed run ends exactly where the uninterrupted one does. They also take the run-directory lock
and preflight of normal runs, and `hecate inspect` reports a staged config per stage."""
import json

import pytest
import safetensors.torch
import torch

from hecate.cli import main
from hecate.train.checkpoint_io import CheckpointError
from hecate.train.faults import RunDirInUseError, RunLock
from hecate.train.stages import load_stage_config, train_stages

CONFIG = "configs/models/tiny-uni-moe.yaml"
STEPS = ["stages.steps=1", "stages.experts.steps=3", "data.batch_size=4"]  # align 1, experts 3, lora 1


def _cfg(out, every=0, extra=()):
    return load_stage_config(CONFIG, [*STEPS, f"train.out_dir={out}", f"checkpoint.every={every}", *extra])


def _run(out, every=0, fault=None, resume=False, monkeypatch=None):
    if fault:
        monkeypatch.setenv("HECATE_FAULT", fault)
        if fault.startswith("term"):  # a SIGTERM: the step ends, is checkpointed, the run stops
            summary = train_stages(_cfg(out, every))
            assert summary["stopped"] and summary["checkpoint"].endswith(f"step_{summary['stopped_at']:08d}")
        else:
            with pytest.raises(RuntimeError, match="injected fault"):
                train_stages(_cfg(out, every))
        monkeypatch.delenv("HECATE_FAULT")
        return None
    return train_stages(_cfg(out, every), resume=resume)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# After step 2 (experts step 1): a crash resumes from the mid-stage checkpoint (checkpoint.every=1)
# or the align stage's end (every=0); a SIGTERM checkpoints step 2 itself and stops.
@pytest.mark.parametrize("every,fault,resumed_from", [(1, "raise:0:3", 2), (0, "raise:0:3", 1), (0, "term:0:3", 2)])
def test_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch, every, fault, resumed_from):
    monkeypatch.delenv("HECATE_RUN_LOCK_HELD", raising=False)
    ref, out = tmp_path / "ref", tmp_path / "run"
    _run(ref, every)
    _run(out, every, fault=fault, monkeypatch=monkeypatch)
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    summary = _run(out, every, resume=True)
    assert summary["resumed_from"] == resumed_from
    assert summary["checkpoint"].endswith("step_00000005")

    # Every step logged once, with the uninterrupted run's losses (same weights, optimizer state, data).
    got, want = _metrics(out), _metrics(ref)
    assert [(m["step"], m["stage"]) for m in got] == [(m["step"], m["stage"]) for m in want]
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    stages, ref_stages = json.loads((out / "stages.json").read_text()), json.loads((ref / "stages.json").read_text())
    assert [s["name"] for s in stages] == ["align", "experts", "lora"]
    for s, r in zip(stages, ref_stages):
        a, b = safetensors.torch.load_file(s["snapshot"]), safetensors.torch.load_file(r["snapshot"])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), s["name"]
        assert (s["first_loss"], s["last_loss"], s["trainable"]) == (r["first_loss"], r["last_loss"], r["trainable"])


def test_resume_verifies_the_finished_stages_and_the_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HECATE_RUN_LOCK_HELD", raising=False)
    out = tmp_path / "run"
    _run(out, 1, fault="raise:0:4", monkeypatch=monkeypatch)  # align over, 2 experts steps in

    # The config must still describe the run the checkpoint belongs to.
    with pytest.raises(ValueError, match=r"stages\[0\] ran as align for 1 steps"):
        train_stages(_cfg(out, 1, ["stages.align.steps=2"]), resume=True)
    with pytest.raises(ValueError, match="2 steps into stages\\[1\\]"):
        train_stages(_cfg(out, 1, ["stages.experts.steps=1"]), resume=True)
    with pytest.raises(ValueError, match="seed differs"):
        train_stages(_cfg(out, 1, ["train.seed=1"]), resume=True)

    # A finished stage's snapshot that no longer matches its recorded sha256 stops the resume,
    # in the CLI's preflight (before any worker starts) and in the worker.
    snap = out / "stages" / "0-align.safetensors"
    data = bytearray(snap.read_bytes())
    data[-1] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="0-align.safetensors"):
        train_stages(_cfg(out, 1), resume=True)
    args = ["train", CONFIG, "--resume", *sum((["--set", s] for s in [*STEPS, f"train.out_dir={out}"]), [])]
    assert main(args) == 2
    assert "0-align.safetensors" in capsys.readouterr().err

    # A truncated checkpoint shard is refused too, naming the file.
    shard = out / "checkpoints" / "step_00000003" / "rank_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    assert main(args) == 2
    assert "rank_00000.safetensors" in capsys.readouterr().err


def test_staged_runs_take_the_run_dir_lock_and_preflight(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HECATE_RUN_LOCK_HELD", raising=False)
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in [*STEPS, f"train.out_dir={out}"]), [])
    assert main(["train", CONFIG, "--resume", *sets]) == 2
    assert "--resume: no checkpoints under" in capsys.readouterr().err
    lock = RunLock(out).acquire()
    try:
        assert main(["train", CONFIG, *sets]) == 2  # the CLI's preflight
        assert "is in use by another run" in capsys.readouterr().err
        with pytest.raises(RunDirInUseError):  # a worker started without hecate's launcher (torchrun)
            train_stages(_cfg(out))
    finally:
        lock.release()
    assert not (out / "metrics.jsonl").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", CONFIG, "--set", f"train.out_dir={blocker}/run"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_inspect_reports_a_staged_config_per_stage(capsys):
    from hecate.models.registry import build_model
    from hecate.parallel import build_strategy, parallelize

    assert main(["inspect", CONFIG, "--json", "--set", "stages.experts.steps=7"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_stage_config(CONFIG)
    model = build_model("uni_moe", cfg.model)
    parallelize(model, build_strategy("local", None))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert info["total_params"] == sum(sizes.values())
    assert [(s["name"], s["steps"]) for s in info["stages"]] == [("align", 20), ("experts", 7), ("lora", 20)]
    for s in info["stages"]:
        assert s["trainable_params"] == sum(sizes[n] for n in model.stage_parameters(s["name"])) > 0
    assert info["memory_per_rank"]["strategy"] == "local"
    assert main(["inspect", CONFIG, "--strategy", "ep", "--nproc", "2"]) == 0
    text = capsys.readouterr().out
    assert "stage experts" in text and "memory per rank (ep, world 2)" in text
    assert main(["inspect", CONFIG, "--nproc", "2"]) == 2  # parallel.strategy=local
    assert "runs on 1 rank, got 2" in capsys.readouterr().err
