"""hecate's local launcher with stand-in ranks (tests/fake_worker.py, no torch): one error line
with its rank and exit 2, restarts after a SIGKILLed rank, SIGTERM forwarding, ranks that die
with a killed launcher, the safe import path, and the single-node rendezvous without sockets."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hecate.train.launch import RESUME_IF_ANY, LaunchSpec, launch, parse_endpoint, worker_command

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, mode, **kw):
    return LaunchSpec(nproc=2, worker_args=["cfg.yaml"], module="tests.fake_worker", grace_s=0.5,
                      env={"FAKE_MODE": mode, "FAKE_LOG": str(tmp_path / "log")}, **kw)


def _log(tmp_path):
    return [line.split() for line in (tmp_path / "log").read_text().splitlines()]


def test_first_error_is_one_line_with_its_rank(tmp_path, capfd):
    assert launch(_spec(tmp_path, "fail1")) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert lines == ["hecate train: error: rank 1: model.moe.top_k=9 exceeds num_experts=4"], err


def test_sigkilled_rank_restarts_the_group_with_resume(tmp_path, capfd):
    assert launch(_spec(tmp_path, "sigkill1", max_restarts=1)) == 0
    log = _log(tmp_path)
    assert sorted((a, r) for a, r, *_ in log) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all((RESUME_IF_ANY in rest) == (a == "1") for a, r, pid, *rest in log)
    assert "rank 1 was killed by SIGKILL; restarting" in capfd.readouterr().err
    # Without restarts the same failure is the run's one error line.
    (tmp_path / "log").unlink()
    assert launch(_spec(tmp_path, "sigkill1")) == 2
    assert "error: rank 1 was killed by SIGKILL" in capfd.readouterr().err


def _launcher_process(tmp_path, mode, cwd=None):
    code = ("import sys; from hecate.train.launch import LaunchSpec, launch; "
            f"sys.exit(launch(LaunchSpec(nproc=2, worker_args=[], module='tests.fake_worker', "
            f"env={{'FAKE_MODE': {mode!r}, 'FAKE_LOG': {str(tmp_path / 'log')!r}, 'FAKE_IMPORT_YAML': '1'}})))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd or ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_ranks(tmp_path, n=2, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (tmp_path / "log").exists() and len(_log(tmp_path)) >= n:
            return [int(fields[2]) for fields in _log(tmp_path)]
        time.sleep(0.05)
    raise AssertionError("the ranks did not start")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_is_forwarded_and_the_launcher_exits_143(tmp_path):
    proc = _launcher_process(tmp_path, "term")
    _wait_for_ranks(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped (SIGTERM)" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_die_with_a_killed_launcher_and_never_import_from_cwd(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    marker = tmp_path / "pwned"
    (work / "yaml.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    proc = _launcher_process(tmp_path, "sleep", cwd=work)
    pids = _wait_for_ranks(tmp_path)
    proc.kill()  # SIGKILL: no chance to clean up; the kernel tells the ranks (PR_SET_PDEATHSIG)
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert not marker.exists()


def test_worker_command_uses_the_safe_path():
    cmd = worker_command("hecate.train", ["x"])
    assert cmd[0] == sys.executable and cmd[-3:] == ["-m", "hecate.train", "x"][-3:]
    if sys.version_info >= (3, 11):
        assert cmd[1] == "-P"


def test_spec_and_endpoint_errors():
    assert parse_endpoint("node0:29500") == ("node0", 29500)
    assert parse_endpoint("[::1]:29500") == ("::1", 29500)
    for bad in ("node0", "node0:x", ":29500", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_endpoint(bad)
    with pytest.raises(ValueError, match="--nproc=0"):
        LaunchSpec(nproc=0, worker_args=[]).validate()
    with pytest.raises(ValueError, match="needs --rdzv-endpoint"):
        LaunchSpec(nproc=1, worker_args=[], nnodes=2, node_rank=1).validate()
    with pytest.raises(ValueError, match="one node only"):
        LaunchSpec(nproc=1, worker_args=[], rdzv_endpoint="h:1", max_restarts=1).validate()


def test_single_node_env_has_no_network_rendezvous(tmp_path):
    from hecate.train.launch import Launcher

    env = Launcher(_spec(tmp_path, "ok"))._env(1, str(tmp_path), 0, str(tmp_path))
    assert env["HECATE_STORE"].startswith("file://") and env["PYTHONSAFEPATH"] == "1"
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["GLOO_SOCKET_IFNAME"] in ("lo", "lo0",
                                                                                             os.environ.get("GLOO_SOCKET_IFNAME"))
