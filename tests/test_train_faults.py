"""Fault injection with real `hecate train` processes and real signals (tiny model, 2 ranks,
short timeouts): a SIGKILLed rank under --max-restarts then a SIGKILLed launcher, a SIGSTOPped
rank, and two launchers joined by --rdzv-endpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _cmd(out, *extra, nproc=2):
    return [sys.executable, "-P", "-m", "hecate.cli", "train", "tiny_fssdp", "--nproc", str(nproc),
            "--set", f"train.out_dir={out}", "--set", "data.embedded_max_bytes=100000",
            "--set", f"data.cache_dir={out.parent}/cache", "--set", "logging.heatmap=false",
            "--set", "sample.num_samples=0", "--set", "logging.progress=false", "--set", "train.log_every=1",
            *extra]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def _steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening_addresses(pids):
    """Local addresses of the TCP sockets in LISTEN state that `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except (FileNotFoundError, PermissionError):
            continue
    addrs = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    addrs.append(fields[1].split(":")[0])
    return addrs


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_restart_after_a_killed_rank_then_a_killed_launcher(tmp_path):
    """Items 1, 2, 6, 9, 10, 11 in one run. Rank 1 SIGKILLs itself at step 6: --max-restarts starts
    both ranks again from step 3's checkpoint (metrics.jsonl cut back to step 3). Then the launcher
    is SIGKILLed: the ranks finish their step, save it on every rank and exit. Throughout: no socket
    beyond loopback, no import from the working directory, every step logged exactly once."""
    out, work = tmp_path / "run", tmp_path / "cwd"
    work.mkdir()
    marker = tmp_path / "pwned"
    (work / "yaml.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(_cmd(out, "--max-restarts", "1", "--set", "train.steps=100000",
                                     "--set", "checkpoint.every=3"),
                                cwd=work, env=_env(HECATE_FAULT="kill:1:6"), stdout=subprocess.DEVNULL, stderr=err)
    ranks = []
    try:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:
            if "restarting" in err_path.read_text() and _steps(out) and _steps(out)[-1] >= 8:
                break
            time.sleep(0.1)
        assert proc.poll() is None and _steps(out)[-1] >= 8, err_path.read_text()[-3000:]
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        addrs = _listening_addresses([proc.pid, *ranks])
        assert addrs and set(addrs) <= LOOPBACK, addrs
    finally:
        proc.kill()  # SIGKILL: no chance to clean up; the kernel tells the ranks (PR_SET_PDEATHSIG)
        proc.wait(timeout=30)
    deadline = time.time() + 60
    while any(_alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in ranks), "ranks outlived their launcher"
    assert not marker.exists(), "a yaml.py in the working directory was imported"
    assert "rank 1 was killed by SIGKILL; restarting every rank from the newest checkpoint" in err_path.read_text()
    stopped = _steps(out)[-1]
    assert _steps(out) == list(range(1, stopped + 1))  # nothing lost or repeated across the restart
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"  # the step they were in was finished and saved, on all ranks
    assert len(json.loads((out / "checkpoints" / latest / "manifest.json").read_text())["files"]) == 2
    from hecate.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(str(out / "checkpoints")) == stopped  # loadable: sizes and sha256 check out


def test_stopped_rank_times_out_with_one_error_line_naming_it(tmp_path):
    """Items 4 and 12: a SIGSTOPped rank fails the run after train.collective_timeout_s with one line
    that names the waiting rank, the missing rank and the MoE layer; exit code 2; nobody left behind."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, "--set", "train.steps=6", "--set", "train.collective_timeout_s=3"),
                            cwd=tmp_path, env=_env(HECATE_FAULT="stop:1:3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hecate train: error: rank 0: a collective did not complete within "
                               "train.collective_timeout_s=3s at step 3: MoE layer"), lines[0]
    assert "ranks [1] did not reach it" in lines[0]
    assert "Traceback" not in err and "ChildFailedError" not in err


def test_two_nodes_meet_only_through_the_explicit_rdzv_endpoint(tmp_path):
    """Item 1, several nodes: two launchers of one rank each on this host, joined by --rdzv-endpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = [subprocess.Popen(_cmd(out, "--set", "train.steps=2", "--set", "parallel.strategy=dp", "--nnodes", "2",
                                   "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}", nproc=1),
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert _steps(out) == [1, 2]
