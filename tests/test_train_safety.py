"""Reliability in one process: non-finite guard, SIGTERM mid-run, metrics truncation, run lock,
start-up agreement (2 pooled ranks), checkpoint pointers and manifests that lie, YAML errors,
pre-flight checks, device mapping."""
import json
import math
import os
import signal
import warnings

import pytest
import torch
import torch.distributed as dist

from hecate.train.checkpoint_io import CheckpointError
from hecate.train.config import load_config
from hecate.train.faults import NonFiniteError, RunDirInUseError, RunLock

fresh_group = pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")


def _cfg(tmp_path, name, *extra):
    return load_config("tiny_dp", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=4",
                                   "train.log_every=1", "train.eval_every=100", "data.embedded_max_bytes=100000",
                                   f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/{name}",
                                   "logging.progress=false", "logging.heatmap=false", *extra])


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- item 8: non-finite guard -------------------------------------------------------------------
def test_engine_skips_a_nan_gradient_and_leaves_the_parameters():
    from hecate.parallel.local import LocalStrategy
    from hecate.train.engine import Engine

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    engine = Engine(model, LocalStrategy(), None, lr=0.1, max_grad_norm=1.0, skip_nonfinite=True)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")  # norm > max is False for NaN: clipping alone lets it through
    assert math.isnan(engine.step())
    assert engine.last_step_skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    engine.step(loss_finite=False)
    assert engine.last_step_skipped and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    engine.step()
    assert not engine.last_step_skipped and not torch.equal(before[0], model.weight)


@fresh_group
def test_diverging_run_stops_nonzero_and_never_checkpoints_after_nan(tmp_path):
    from hecate.train.checkpoint import verify_checkpoint
    from hecate.train.trainer import train

    blowup = ["optim.lr=1e6", "optim.min_lr=0", "optim.warmup_steps=0", "checkpoint.every=1", "checkpoint.keep=2",
              "train.steps=8"]
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row \(train.max_nonfinite_skips=3\)"):
        train(_cfg(tmp_path, "skip", *blowup))
    recs = _records(tmp_path / "skip" / "metrics.jsonl")
    skipped = [r["step"] for r in recs if r.get("skipped")]
    assert len(skipped) == 2 and all(r["step"] < skipped[0] for r in recs if "loss" in r and not r.get("skipped"))
    ckpt = tmp_path / "skip" / "checkpoints"
    # the good checkpoints before the first NaN survive; nothing was written or pruned after it
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{s:08d}" for s in (skipped[0] - 2, skipped[0] - 1)]
    assert verify_checkpoint(str(ckpt)) == skipped[0] - 1
    with pytest.raises(NonFiniteError, match="train.on_nonfinite=stop"):
        train(_cfg(tmp_path, "stop", *blowup, "train.on_nonfinite=stop"))
    assert not dist.is_initialized()


# ---- item 9: SIGTERM finishes the step and saves --------------------------------------------------
@fresh_group
def test_sigterm_mid_run_saves_the_finished_step(tmp_path, monkeypatch):
    from hecate.train.trainer import train

    monkeypatch.setenv("HECATE_FAULT", "term:0:2")  # a real SIGTERM to this process at the start of step 2
    summary = train(_cfg(tmp_path, "term", "train.steps=50"))
    assert summary["stopped"] and summary["stopped_at"] == 2
    assert (tmp_path / "term" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ---- item 10: metrics truncated to the resumed step ---------------------------------------------
def test_truncate_metrics_keeps_steps_up_to_the_resume_point(tmp_path):
    from hecate.train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 4, "val_loss": 2.0},
                                                              {"step": 5, "summary": {}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')  # torn last line
    assert truncate_metrics(path, 3) == 5
    assert [r["step"] for r in _records(path)] == [1, 2, 3]


# ---- item 7: the run directory lock --------------------------------------------------------------
def test_second_run_on_the_same_out_dir_is_refused(tmp_path, capsys, monkeypatch):
    import hecate.cli
    import hecate.train.launch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(hecate.train.launch, "launch", lambda spec: pytest.fail("launched"))
    lock = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunDirInUseError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
        code = hecate.cli.main(["train", "tiny_dp", "--set", f"train.out_dir={tmp_path}/run"])
        assert code == 2 and "is in use by another run" in capsys.readouterr().err
    finally:
        lock.release()
    RunLock(tmp_path / "run").acquire().release()  # free again once the holder lets go


# ---- item 12: pre-flight checks before any worker starts ----------------------------------------
def test_preflight_refuses_before_launching(tmp_path, capsys, monkeypatch):
    import hecate.cli
    import hecate.train.launch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(hecate.train.launch, "launch", lambda spec: pytest.fail("launched"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = hecate.cli.main(["train", "tiny_dp", "--set", f"train.out_dir={blocker}/run"])
    assert code == 2 and f"train.out_dir={blocker}/run is not writable" in capsys.readouterr().err
    code = hecate.cli.main(["train", "tiny_dp", "--resume", "--set", f"train.out_dir={tmp_path}/none"])
    assert code == 2 and "--resume: no checkpoints under" in capsys.readouterr().err
    run = _saved_run(tmp_path)
    shard = run / "checkpoints" / "step_00000002" / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    code = hecate.cli.main(["train", "tiny_dp", "--resume", "--set", f"train.out_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "rank_00000.safetensors fails its sha256" in err and len(err.splitlines()) == 1
    code = hecate.cli.main(["train", "tiny_dp", "--set", "data.source=/no/such/file.txt",
                            "--set", f"train.out_dir={tmp_path}/d"])
    assert code == 2 and "data.source='/no/such/file.txt' is not a file" in capsys.readouterr().err


# ---- items 3 and 13: checkpoint pointers and manifests -------------------------------------------
def _saved_run(tmp_path):
    """A run dir with two local-strategy checkpoints (steps 1 and 2)."""
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import parallelize
    from hecate.parallel.local import LocalStrategy
    from hecate.train.checkpoint import save_checkpoint
    from tests.training_cases import tiny_config

    run = tmp_path / "saved"
    torch.manual_seed(0)
    strat = LocalStrategy()
    model = parallelize(MoETransformer(tiny_config()), strat)
    for step in (1, 2):
        save_checkpoint(str(run / "checkpoints"), model, strat, None, step)
    return run


def _local_model():
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import parallelize
    from hecate.parallel.local import LocalStrategy
    from tests.training_cases import tiny_config

    strat = LocalStrategy()
    return parallelize(MoETransformer(tiny_config()), strat), strat


def test_latest_outside_the_run_is_refused(tmp_path):
    from hecate.train.checkpoint import load_checkpoint

    ckpt = _saved_run(tmp_path) / "checkpoints"
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    os.rename(ckpt / "step_00000001", other / "step_00000001")
    model, strat = _local_model()
    for name in ("../../other/checkpoints/step_00000001", str(other / "step_00000001"), "..", "manifest.json"):
        (ckpt / "latest").write_text(name + "\n")
        with pytest.raises(CheckpointError, match="outside|inside the run's checkpoint directory"):
            load_checkpoint(str(ckpt), model, strat)
    os.symlink(other / "step_00000001", ckpt / "step_00000009")  # a planted link is outside too
    (ckpt / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(str(ckpt), model, strat)


def test_binary_latest_and_manifest_are_named_and_fall_back(tmp_path):
    from hecate.train.checkpoint import load_checkpoint, read_manifest

    ckpt = _saved_run(tmp_path) / "checkpoints"
    model, strat = _local_model()
    (ckpt / "latest").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.warns(UserWarning, match=f"{ckpt / 'latest'} is not text"):
        assert load_checkpoint(str(ckpt), model, strat) == 2
    (ckpt / "latest").write_text("step_00000002\n")
    manifest = ckpt / "step_00000002" / "manifest.json"
    good = manifest.read_bytes()
    manifest.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    with pytest.raises(CheckpointError, match=f"{manifest} is not UTF-8 text"):
        read_manifest(str(manifest.parent))
    with pytest.warns(UserWarning, match="not UTF-8 text .*; trying an older checkpoint"):
        assert load_checkpoint(str(ckpt), model, strat) == 1
    data = json.loads(good)
    del data["files"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest.json: key 'files' is missing"):
        read_manifest(str(manifest.parent))
    with pytest.raises(CheckpointError, match="key 'files' is missing"):
        load_checkpoint(str(manifest.parent), model, strat)
    (ckpt / "step_00000001" / "manifest.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no checkpoint under .* has a readable manifest"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_checkpoint(str(ckpt), model, strat)


# ---- item 13: config errors ----------------------------------------------------------------------
def test_yaml_errors_name_file_and_line_and_never_run_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n bad: [\n")
    with pytest.raises(ValueError, match=rf"^{bad}:3: invalid YAML"):
        load_config(str(bad))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError, match=rf"^{evil}:1: invalid YAML: could not determine a constructor"):
        load_config(str(evil))
    assert not marker.exists()
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(str(tmp_path / "bin.yaml"))
    with pytest.raises(ValueError, match="^--set optim.lr:1: invalid YAML"):
        load_config("tiny_dp", ["optim.lr=[1"])


@pytest.mark.parametrize("override, key", [("optim.lr=.inf", "optim.lr"),
                                           ("model.moe.aux_loss_coeff=.nan", "model.moe.aux_loss_coeff"),
                                           ("optim.betas=[0.9, .nan]", "optim.betas[1]")])
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ValueError, match=rf"^{key.replace('[', '.').replace(']', '.')} must be a finite number"):
        load_config("tiny_dp", [override])


def test_layout_checks_every_layers_expert_count():
    with pytest.raises(ValueError, match=r"model.moe_experts_per_layer\[1\]=6"):
        load_config("tiny_ep", ["model.moe_experts_per_layer=[4, 6]", "parallel.ep_size=4"], world_size=4)


# ---- item 4: device mapping on CUDA (mocked) -----------------------------------------------------
def test_local_rank_maps_to_a_visible_device_and_device_id_is_passed(monkeypatch):
    from hecate.train import trainer

    assert [trainer.local_device_index(r, 3) for r in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="no CUDA device"):
        trainer.local_device_index(0, 0)
    calls = []
    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainer.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(trainer.torch.cuda, "set_device", lambda d: calls.append(("set", d)))
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    from torch.distributed import distributed_c10d

    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("RANK", raising=False)
    device, owns = trainer.init_distributed(timeout_s=7)
    assert device == torch.device("cuda", 1) and owns
    (_, d), (_, args, kw) = calls
    assert d == device and args == ("nccl",) and kw["device_id"] == device
    assert kw["timeout"].total_seconds() == 7
    trainer._set_default_group_timeout(None)


# ---- item 5: start-up agreement (2 pooled ranks) -------------------------------------------------
def agreement_case(rank, world):
    from hecate.comm.agreement import AgreementError
    from hecate.train.run_agreement import check_run_agreement, config_entries

    same = load_config("tiny_fssdp")
    check_run_agreement("config", config_entries(same, world), rank, world)  # equal: passes
    cfg = load_config("tiny_fssdp", [f"model.moe.top_k={2 - rank}", f"data.cache_dir=/tmp/r{rank}"])
    try:
        check_run_agreement("config", config_entries(cfg, world), rank, world)
    except AgreementError as e:
        return str(e), e.minority_ranks, e.majority_ranks
    return None


def test_ranks_with_different_configs_raise_one_agreement_error():
    from hecate.testing import run_distributed

    results = run_distributed(agreement_case, 2)
    assert results[0] == results[1] and results[0] is not None
    message, minority, majority = results[0]
    assert "config.model.moe.top_k (rank 0: 2, rank 1: 1)" in message and "cache_dir" not in message
    assert sorted(minority + majority) == [0, 1]


@fresh_group
def test_collective_timeout_bounds_later_groups_too():
    from torch.distributed import distributed_c10d

    from hecate.train.trainer import _set_default_group_timeout, init_distributed

    torch_default = distributed_c10d.default_pg_timeout
    _, owns = init_distributed(timeout_s=11)
    try:
        group = dist.new_group(ranks=[0])  # e.g. a node or expert-parallel group made by a strategy
        backend = group._get_backend(torch.device("cpu"))
        assert backend.options._timeout.total_seconds() == 11
    finally:
        if owns:
            dist.destroy_process_group()
        _set_default_group_timeout(None)
    assert distributed_c10d.default_pg_timeout == torch_default
