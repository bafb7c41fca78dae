"""The local launcher of `hecate train`: starts the ranks of this node and watches them.

Why not torch's elastic agent: its TCP stores listen on every interface, its failures arrive
as a 40-70 line ChildFailedError with the message twice, and its workers outlive a killed
agent. This launcher:

* rendezvous: single node, a FileStore in a private 0700 temp directory (no socket at all)
  and gloo/NCCL bound to the loopback interface; several nodes only with an explicit
  `--rdzv-endpoint HOST:PORT`, where node 0's launcher serves a TCPStore on PORT on every
  interface of that host (see docs/training.md);
* starts every worker as `python -P -m hecate.train ...` (safe path: the working directory
  is not on sys.path, so a stray `yaml.py` there is never imported);
* workers die with the launcher (hecate.train.faults.die_with_parent);
* on the first failure it stops the others and prints the first failing rank's error once,
  as one line naming the rank, and exits 2 (a rank of an NCCL run killed by SIGABRT, the NCCL
  watchdog's end for a collective past train.collective_timeout_s, is named as such); with
  `max_restarts` a group that lost a rank (killed, crashed, timed out) is restarted from the
  newest checkpoint;
* SIGTERM/SIGINT are forwarded as SIGTERM: the ranks finish the step, save a checkpoint and
  exit; the launcher exits 128 + the signal number.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hecate.train.faults import (EXIT_ERROR, EXIT_STOPPED, nccl_abort_message, read_nccl_records,
                                 read_worker_errors)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESUME_IF_ANY = "--resume-if-any"

# Python < 3.11 has no -P: drop the working directory from sys.path by hand, then run the module.
_SAFE_BOOT = ("import sys, runpy; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
              "m = sys.argv[1]; sys.argv = [m] + sys.argv[2:]; runpy.run_module(m, run_name='__main__', alter_sys=True)")


def worker_command(module: str, args: list[str]) -> list[str]:
    """`python -P -m MODULE ARGS` (or the same without -P on Python 3.10)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _SAFE_BOOT, module, *args]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint={endpoint!r} must be HOST:PORT (e.g. node0:29500)")
    return host.strip("[]"), int(port)


@dataclass
class LaunchSpec:
    nproc: int
    worker_args: list[str]
    max_restarts: int = 0
    rdzv_endpoint: str | None = None   # None: single node (FileStore, loopback only)
    nnodes: int = 1
    node_rank: int = 0
    module: str = "hecate.train"
    grace_s: float = 3.0               # after the first failure, how long the others get to exit
    env: dict = field(default_factory=dict)
    command: str = "train"             # names the command in the failure line ("hecate train: error: ...")

    def validate(self) -> "LaunchSpec":
        if self.nproc < 1:
            raise ValueError(f"--nproc={self.nproc} must be >= 1")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts={self.max_restarts} must be >= 0")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank={self.node_rank} must be in [0, --nnodes={self.nnodes})")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address)")
        if self.rdzv_endpoint is not None:
            parse_endpoint(self.rdzv_endpoint)
            if self.max_restarts:
                raise ValueError("--max-restarts works on one node only; for several nodes use torchrun's "
                                 "--max-restarts (launch/torchrun_multi_node.sh)")
        return self


@dataclass
class Outcome:
    kind: str                 # ok | stopped | failed
    message: str = ""
    traceback: str = ""
    restartable: bool = False
    signum: int | None = None


class _Signals:
    """The launcher's SIGTERM/SIGINT: forward SIGTERM to the workers once; a second signal kills."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.procs: list[subprocess.Popen] = []
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.count == 1:
            print(f"[hecate] {signal.Signals(signum).name}: the ranks finish their step, save a checkpoint "
                  "and exit (signal again to kill them now)", file=sys.stderr, flush=True)
            _send(self.procs, signal.SIGTERM)
        else:
            _send(self.procs, signal.SIGKILL)


def _send(procs, sig) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
                if sig == signal.SIGKILL:
                    os.kill(p.pid, signal.SIGCONT)  # harmless; a stopped process dies at once anyway
            except ProcessLookupError:
                pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _loopback_env() -> dict:
    # Single node: keep gloo's and NCCL's sockets on the loopback interface (unless the user chose).
    lo = "lo0" if sys.platform == "darwin" else "lo"
    return {k: os.environ.get(k, lo) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


class Launcher:
    def __init__(self, spec: LaunchSpec):
        self.spec = spec.validate()
        self.signals = _Signals()
        self.master_store = None

    def _store_spec(self, workdir: str, attempt: int) -> str:
        if self.spec.rdzv_endpoint is None:
            return "file://" + os.path.join(workdir, f"store.{attempt}")
        host, port = parse_endpoint(self.spec.rdzv_endpoint)
        if self.spec.node_rank == 0 and self.master_store is None:
            import datetime

            import torch.distributed as dist

            # Listens on every interface of this host: that is what --rdzv-endpoint asks for.
            self.master_store = dist.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=300),
                                              wait_for_workers=False)
        return f"tcp://{host}:{port}"

    def _env(self, local_rank: int, workdir: str, attempt: int, error_dir: str) -> dict:
        s = self.spec
        env = dict(os.environ)
        path = env.get("PYTHONPATH", "")
        env.update({
            "RANK": str(s.node_rank * s.nproc + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(s.nnodes * s.nproc), "LOCAL_WORLD_SIZE": str(s.nproc), "GROUP_RANK": str(s.node_rank),
            "HECATE_STORE": self._store_spec(workdir, attempt), "HECATE_ATTEMPT": str(attempt),
            "HECATE_ERROR_DIR": error_dir, "HECATE_LAUNCHER_PID": str(os.getpid()),
            "HECATE_RUN_LOCK_HELD": "1", "PYTHONSAFEPATH": "1",
            "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
            # Workers share the cores; without this every worker starts one thread per core.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // s.nproc))),
        })
        if s.rdzv_endpoint is None:
            env.update(_loopback_env())
        env.update(s.env)
        return env

    def run(self) -> int:
        s = self.spec
        workdir = tempfile.mkdtemp(prefix="hecate-launch-")  # 0700: only this user sees the store
        self.signals.install()
        try:
            for attempt in range(s.max_restarts + 1):
                outcome = self._run_group(workdir, attempt)
                if outcome.kind == "ok":
                    return 0
                if outcome.kind == "stopped":
                    print(f"[hecate] stopped ({outcome.message}); continue with --resume", file=sys.stderr,
                          flush=True)
                    return 128 + outcome.signum if outcome.signum else EXIT_STOPPED
                if attempt < s.max_restarts and outcome.restartable and self.signals.signum is None:
                    print(f"[hecate] {outcome.message}; restarting every rank from the newest checkpoint "
                          f"(restart {attempt + 1} of {s.max_restarts})", file=sys.stderr, flush=True)
                    continue
                print(f"hecate {s.command}: error: {outcome.message}", file=sys.stderr, flush=True)
                if outcome.traceback:
                    print(outcome.traceback.rstrip(), file=sys.stderr, flush=True)
                return EXIT_ERROR
            return EXIT_ERROR  # pragma: no cover - the loop always returns
        finally:
            self.signals.uninstall()
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_group(self, workdir: str, attempt: int) -> Outcome:
        s = self.spec
        error_dir = os.path.join(workdir, f"errors.{attempt}")
        os.makedirs(error_dir)
        args = list(s.worker_args) + ([RESUME_IF_ANY] if attempt and RESUME_IF_ANY not in s.worker_args else [])
        procs: list[subprocess.Popen] = []
        self.signals.procs = procs
        for local_rank in range(s.nproc):
            procs.append(subprocess.Popen(worker_command(s.module, args),
                                          env=self._env(local_rank, workdir, attempt, error_dir)))
        killed_by_us: set[int] = set()
        try:
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0, EXIT_STOPPED) for c in codes) and self.signals.signum is None:
                    # First failure: give the others a moment to report their own error, then kill.
                    deadline = time.time() + s.grace_s
                    while time.time() < deadline and any(p.poll() is None for p in procs):
                        time.sleep(0.05)
                    killed_by_us = {i for i, p in enumerate(procs) if p.poll() is None}
                    _send(procs, signal.SIGKILL)
                    for p in procs:
                        p.wait()
                    break
                time.sleep(0.05)
        finally:
            if any(p.poll() is None for p in procs):  # an exception in the loop (KeyboardInterrupt...)
                _send(procs, signal.SIGKILL)
                for p in procs:
                    p.wait()
        codes = [p.returncode for p in procs]
        return self._classify(codes, killed_by_us, error_dir)

    def _classify(self, codes: list[int], killed_by_us: set[int], error_dir: str) -> Outcome:
        s = self.spec
        rank0 = s.node_rank * s.nproc
        if all(c == 0 for c in codes):
            return Outcome("ok")
        # Asked to stop: ranks that saved exit EXIT_STOPPED; one still starting dies of the signal itself.
        # (130: a rank interrupted by Ctrl-C before its handler was installed.)
        asked = {0, EXIT_STOPPED} | ({-signal.SIGTERM, -signal.SIGINT, 130} if self.signals.signum else set())
        if all(c in asked for c in codes):
            sig = self.signals.signum
            why = signal.Signals(sig).name if sig else "a rank was asked to stop"
            return Outcome("stopped", why, signum=sig)
        errors = read_worker_errors(error_dir)
        signaled = [i for i, c in enumerate(codes) if c is not None and c < 0 and i not in killed_by_us]
        if signaled:
            # A rank of an NCCL run that died of SIGABRT: how torch's watchdog ends a collective past
            # train.collective_timeout_s (faults.py, "NCCL collective timeouts"). Name that.
            nccl = read_nccl_records(error_dir)
            aborted = [i for i in signaled if codes[i] == -signal.SIGABRT and rank0 + i in nccl]
            if aborted:
                i = aborted[0]
                running = sorted(rank0 + j for j in killed_by_us)
                return Outcome("failed", nccl_abort_message(rank0 + i, nccl[rank0 + i], running), restartable=True)
            i = signaled[0]
            return Outcome("failed", f"rank {rank0 + i} was killed by {_signal_name(codes[i])}", restartable=True)
        if errors:
            # A rank's own error first; "another rank failed" notes only when nothing else was said.
            rec = min(errors.values(), key=lambda r: (bool(r.get("secondary")), r["time"], r["rank"]))
            restartable = not rec.get("user_error") or rec.get("type") == "CollectiveTimeoutError"
            return Outcome("failed", f"rank {rec['rank']}: {rec['message']}", traceback=rec.get("traceback", ""),
                           restartable=restartable)
        failed = [i for i, c in enumerate(codes) if c not in (0, EXIT_STOPPED) and i not in killed_by_us]
        i = failed[0] if failed else next(i for i, c in enumerate(codes) if c != 0)
        return Outcome("failed", f"rank {rank0 + i} exited with code {codes[i]} (see its output above)",
                       restartable=True)


def launch(spec: LaunchSpec) -> int:
    """Run the ranks of this node to completion; return the launcher's exit code."""
    return Launcher(spec).run()
