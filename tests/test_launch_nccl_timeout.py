"""An NCCL collective timeout ends a rank with SIGABRT (torch's watchdog); the launcher names it.

On gloo the waiting rank raises and the trainer prints "a collective did not complete within
train.collective_timeout_s=..." (tests/test_train_faults.py). On NCCL no Python code runs after the
watchdog's abort, so before, the launcher printed only "rank R was killed by SIGABRT". Now the rank
records its timeout at start-up (faults.record_nccl_rank) and the launcher names the setting and the
key to raise. The CPU tests use stand-in ranks (this file run as the worker module) that record
themselves and abort; the gpu-marked test makes a real NCCL collective time out on one GPU.
"""
import os
import resource
import sys
import time

import pytest

from hecate.train.faults import (NCCL_RECORD, nccl_abort_message, nccl_watchdog_env, read_nccl_records,
                                 record_nccl_rank)
from hecate.train.launch import LaunchSpec, launch


def _spec(tmp_path, mode, nproc=2, **kw):
    env = {"FAKE_MODE": mode, "FAKE_TIMEOUT": "7.5", **kw.pop("env", {})}
    return LaunchSpec(nproc=nproc, worker_args=[], module="tests.test_launch_nccl_timeout", grace_s=0.5,
                      env=env, **kw)


def _error_lines(err):
    return [line for line in err.splitlines() if "error" in line.lower() or line.startswith("[hecate]")]


def test_a_sigabrt_rank_of_an_nccl_run_is_named_with_its_timeout_setting(tmp_path, capfd):
    assert launch(_spec(tmp_path, "abort1")) == 2
    lines = _error_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("hecate train: error: rank 1 was killed by SIGABRT: on NCCL that is how torch's "
                           "watchdog ends a rank whose collective did not complete within "
                           "train.collective_timeout_s=7.5s"), line
    assert "Watchdog caught collective operation timeout" in line  # where torch names the collective
    assert "ranks [0] were still running" in line  # rank 0 never aborted: the launcher stopped it
    assert "raise train.collective_timeout_s" in line


def test_with_a_flight_recorder_dump_the_watchdog_is_named_and_the_dump_given(tmp_path, capfd):
    prefix = str(tmp_path / "trace_")
    assert launch(_spec(tmp_path, "dump_abort1", env={"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix})) == 2
    (line,) = _error_lines(capfd.readouterr().err)
    assert line.startswith("hecate train: error: rank 1: NCCL's watchdog ended the process (SIGABRT): a "
                           "collective did not complete within train.collective_timeout_s=7.5s"), line
    assert f"flight recorder: {prefix}1" in line


def test_a_timed_out_group_restarts_like_a_gloo_timeout(tmp_path, capfd):
    assert launch(_spec(tmp_path, "abort1", max_restarts=1)) == 0  # the restarted attempt runs clean
    err = capfd.readouterr().err
    assert "[hecate] rank 1 was killed by SIGABRT: on NCCL" in err and "restarting every rank" in err, err


def test_sigabrt_without_an_nccl_record_stays_a_plain_signal(tmp_path, capfd):
    # gloo runs (and ranks that died before their process group) write no record.
    assert launch(_spec(tmp_path, "plain_abort1")) == 2
    (line,) = _error_lines(capfd.readouterr().err)
    assert line == "hecate train: error: rank 1 was killed by SIGABRT", line


def test_nccl_env_defaults_respect_the_user_and_warn_on_no_teardown():
    env = {}
    assert nccl_watchdog_env(env, "/run/out/nccl_trace_rank_") == []
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                   "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/run/out/nccl_trace_rank_"}
    mine = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
            "TORCH_FR_BUFFER_SIZE": "0", "TORCH_FR_DUMP_TEMP_FILE": "/elsewhere/x_"}
    env = dict(mine)
    assert nccl_watchdog_env(env, "/run/out/nccl_trace_rank_") == []
    assert env == mine  # the newer TORCH_FR_* spellings win in torch: nothing added beside them
    for mode, says in (("0", "hangs the rank forever"), ("2", "runs on with its unfinished data")):
        (warning,) = nccl_watchdog_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": mode})
        assert f"TORCH_NCCL_ASYNC_ERROR_HANDLING={mode}" in warning and says in warning
        assert "train.collective_timeout_s" in warning


def test_record_needs_a_launcher_and_a_stale_dump_is_not_evidence(tmp_path):
    assert record_nccl_rank(3, 10.0, {}) is None  # under torchrun: nothing to tell
    env = {"HECATE_ERROR_DIR": str(tmp_path), "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "t_")}
    path = record_nccl_rank(3, 10.0, env)
    assert os.path.basename(path) == NCCL_RECORD.format(rank=3)
    record = read_nccl_records(str(tmp_path))[3]
    assert record["collective_timeout_s"] == 10.0 and record["trace"] == str(tmp_path / "t_3")
    (tmp_path / "t_3").write_bytes(b"an older run's dump")
    os.utime(tmp_path / "t_3", (record["started"] - 60, record["started"] - 60))
    assert nccl_abort_message(3, record).startswith("rank 3 was killed by SIGABRT: on NCCL")
    os.utime(tmp_path / "t_3", None)
    assert nccl_abort_message(3, record).startswith("rank 3: NCCL's watchdog ended the process")


NCCL_KEYS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_TRACE_BUFFER_SIZE",
             "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE")


def test_init_distributed_on_cuda_sets_the_env_first_and_records_the_rank(tmp_path, monkeypatch):
    # CUDA faked as in tests/test_train_safety.py: the NCCL branch runs, init_process_group is a spy.
    import torch

    from hecate.train import trainer

    for key in NCCL_KEYS:  # set then delete: monkeypatch restores the test process's own values
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    seen = {}
    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainer.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(trainer.torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group",
                        lambda *a, **k: seen.update({key: os.environ.get(key) for key in NCCL_KEYS}))
    from torch.distributed import distributed_c10d

    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("HECATE_STORE", raising=False)
    monkeypatch.setenv("HECATE_ERROR_DIR", str(tmp_path))
    try:
        device, _ = trainer.init_distributed(timeout_s=42, nccl_trace_dir=str(tmp_path / "run"))
    finally:
        trainer._set_default_group_timeout(None)
    assert device == torch.device("cuda", 0)
    prefix = str(tmp_path / "run" / "nccl_trace_rank_")
    assert seen == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
                    "TORCH_FR_BUFFER_SIZE": None, "TORCH_FR_DUMP_TEMP_FILE": None}  # before the group
    record = read_nccl_records(str(tmp_path))[5]
    assert record["collective_timeout_s"] == 42 and record["trace"] == prefix + "5"


# ---------------------------------------------------------------------------- a real NCCL timeout
@pytest.mark.gpu
# A string condition: evaluated only when pytest runs the test, so a stand-in rank (this module run
# by the launcher) starts without importing torch.
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_real_nccl_timeout_is_named_by_the_launcher(tmp_path, capfd):
    # One rank, one GPU: the all_reduce queues behind a long GPU sleep, so it is still pending when
    # the 3 s timeout passes and torch's watchdog aborts the process (with its flight-recorder dump).
    env = {"TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "5000", "FAKE_TRACE_DIR": str(tmp_path)}
    assert launch(_spec(tmp_path, "real_nccl", nproc=1, env=env)) == 2
    err = capfd.readouterr().err
    assert "Watchdog caught collective operation timeout" in err, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("hecate train: error:")]
    assert line.startswith("hecate train: error: rank 0"), line
    assert "train.collective_timeout_s=3s" in line and "raise train.collective_timeout_s" in line, line


def _worker(rank, mode):
    """A stand-in rank (this module run by the launcher)."""
    from hecate.train.faults import die_with_parent

    die_with_parent(int(os.environ["HECATE_LAUNCHER_PID"]))
    if os.environ["HECATE_ATTEMPT"] != "0":
        sys.exit(0)
    if mode == "real_nccl":
        import torch
        import torch.distributed as dist

        from hecate.train.trainer import init_distributed

        init_distributed(3.0, os.environ["FAKE_TRACE_DIR"])
        x = torch.ones(4, device="cuda")
        torch.cuda._sleep(int(2e11))  # ~100 s of GPU clock: the collective waits behind it
        dist.all_reduce(x)
        torch.cuda.synchronize()
        sys.exit(0)
    if rank != 1:
        time.sleep(60)  # "waiting in the collective": stopped by the launcher
        sys.exit(1)
    if mode != "plain_abort1":
        record_nccl_rank(rank, float(os.environ["FAKE_TIMEOUT"]))
    if mode == "dump_abort1":
        with open(os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] + str(rank), "wb") as f:
            f.write(b"flight recorder")
    time.sleep(0.2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the abort
    os.abort()


if __name__ == "__main__":
    _worker(int(os.environ["RANK"]), os.environ["FAKE_MODE"])
