"""Run a function on W spawned ranks that share a process group, and return their results.

Starting a process that imports torch costs seconds on small machines, so the
worker processes of each (world size, backend) are kept alive for the whole
session and sent one task after another. A pool that timed out, lost a worker
or may have left its process group out of step is killed and rebuilt on the
next call, so one broken test never poisons the next.

Tasks are module-level functions (pickled by reference), called on every rank
as `fn(rank, world_size, *args, **kwargs)`.
"""
from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

__all__ = ["run_distributed", "shutdown_pools", "RemoteTraceback", "DistributedTaskError"]

# Seconds a healthy pool gets to start (spawn + import torch + rendezvous).
_START_TIMEOUT = 180.0
# After one rank fails, how long the others get to finish before the pool is killed
# (a rank that raised leaves its peers blocked in the next collective).
_ERROR_GRACE = 5.0
# Every collective inside the workers fails after this many seconds instead of hanging.
_COLLECTIVE_TIMEOUT = 45.0


class RemoteTraceback(Exception):
    """Carries the traceback text of the rank that raised (set as __cause__)."""

    def __str__(self) -> str:
        return self.args[0]


class DistributedTaskError(RuntimeError):
    """A rank failed in a way that cannot be re-raised as its own exception type."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _worker_main(rank: int, world_size: int, backend: str, host: str, port: int,
                 collective_timeout: float, conn) -> None:
    """Body of one worker: join the process group, then run tasks until told to stop."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    seed = torch.initial_seed()

    def reset_state() -> None:
        # Each task starts as in a fresh process: same RNG seed, grad mode, default dtype.
        torch.manual_seed(seed)
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
    timeout = datetime.timedelta(seconds=collective_timeout)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    device_id = None
    if backend == "nccl":  # one device per rank on a CUDA machine
        device_id = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    # device_id binds NCCL to the device now (eager init) instead of at the first collective.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device_id)
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:  # parent went away
            break
        kind, payload = pickle.loads(message)
        if kind == "stop":
            break
        if kind == "sync":  # checks the group is still in step after a failed task
            try:
                t = torch.ones(1, device=health_check_device(backend))
                dist.all_reduce(t)
                conn.send_bytes(pickle.dumps(("ok", int(t.item()))))
            except Exception:  # noqa: BLE001 - reported as unhealthy
                conn.send_bytes(pickle.dumps(("err", (None, traceback.format_exc()))))
            continue
        try:
            reset_state()
            fn, args, kwargs = pickle.loads(payload)
            result = fn(rank, world_size, *args, **kwargs)
            # The second field tells the parent this worker retires (the task destroyed the group).
            conn.send_bytes(pickle.dumps(("ok", (result, not dist.is_initialized()))))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            text = traceback.format_exc()
            try:
                blob = pickle.dumps(exc)
                pickle.loads(blob)
            except Exception:  # noqa: BLE001 - unpicklable exception: send the text only
                blob = None
            conn.send_bytes(pickle.dumps(("err", (blob, text))))
        if not dist.is_initialized():  # the task destroyed the group: retire this pool
            break
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def health_check_device(backend: str):
    """Where the health check's all-reduce runs: NCCL only reduces CUDA tensors (a CPU
    tensor would make every check fail, and every failed task rebuild the pool)."""
    import torch

    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Pool:
    """W worker processes joined in one process group."""

    def __init__(self, world_size: int, backend: str, collective_timeout: float):
        import torch.distributed as dist

        self.world_size = world_size
        self.backend = backend
        self.key = (world_size, backend, float(collective_timeout))
        ctx = mp.get_context("spawn")
        # The parent hosts the rendezvous store on a free port chosen by the OS (no race).
        self._store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                                    timeout=datetime.timedelta(seconds=_START_TIMEOUT),
                                    wait_for_workers=False)
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, world_size, backend, "127.0.0.1", self._store.port,
                      collective_timeout, child_conn),
                daemon=True,
                name=f"hecate-pool-w{world_size}-r{rank}",
            )
            proc.start()
            child_conn.close()
            self.conns.append(parent_conn)
            self.procs.append(proc)
        replies = self._collect(_START_TIMEOUT, what="start")
        bad = [r for r, (kind, _) in replies.items() if kind != "ready"]
        if bad:
            self.close()
            raise DistributedTaskError(f"pool of world size {world_size}: ranks {bad} failed to start")

    def _collect(self, timeout: float, what: str, grace: float | None = None) -> dict[int, tuple]:
        """Wait for one reply from every rank; raise TimeoutError (pool killed) if one is missing.

        With `grace`, stop waiting `grace` seconds after the first error reply and return
        what arrived (missing ranks are simply absent).
        """
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple] = {}
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.procs)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready = wait(list(pending) + list(sentinels), timeout=left)
            for obj in ready:
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        replies[rank] = pickle.loads(obj.recv_bytes())
                    except (EOFError, OSError):
                        replies[rank] = ("dead", None)
                    if replies[rank][0] != "ok" and grace is not None:
                        deadline = min(deadline, time.monotonic() + grace)
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    conn = self.conns[rank]
                    if conn in pending and not conn.poll():
                        pending.pop(conn)
                        replies[rank] = ("dead", self.procs[rank].exitcode)
                        if grace is not None:
                            deadline = min(deadline, time.monotonic() + grace)
        if pending and (grace is None or all(k == "ok" for k, _ in replies.values())):
            missing = sorted(pending.values())
            self.close()
            raise TimeoutError(
                f"{what} on world size {self.world_size} timed out after {timeout:.1f}s: "
                f"ranks {missing} did not reply (the pool was killed and will be rebuilt)"
            )
        return replies

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list:
        payload = pickle.dumps((fn, args, kwargs))
        message = pickle.dumps(("task", payload))
        for conn in self.conns:
            conn.send_bytes(message)
        replies = self._collect(timeout, what=f"task {getattr(fn, '__qualname__', fn)}",
                                grace=_ERROR_GRACE)
        failed = sorted(r for r, (kind, _) in replies.items() if kind != "ok")
        if not failed:
            if any(replies[r][1][1] for r in range(self.world_size)):
                self.close()  # a task tore down the process group: start afresh next time
            return [replies[r][1][0] for r in range(self.world_size)]
        # Some rank failed: the group is only reusable if every rank returned and the
        # ranks still agree on the collective sequence (a short all_reduce proves it).
        if len(replies) < self.world_size or not self._healthy():
            self.close()
        raise self._error(replies, failed)

    def _healthy(self) -> bool:
        if not self.alive():
            return False
        message = pickle.dumps(("sync", None))
        for conn in self.conns:
            conn.send_bytes(message)
        try:
            replies = self._collect(_ERROR_GRACE, what="health check")
        except TimeoutError:
            return False
        return all(kind == "ok" and value == self.world_size for kind, value in replies.values())

    def _error(self, replies: dict[int, tuple], failed: list[int]) -> BaseException:
        """The exception to raise in the parent: the lowest failing rank's own, annotated."""
        errors = [r for r in failed if replies[r][0] == "err"]
        if not errors:
            codes = {r: replies[r][1] for r in failed}
            return DistributedTaskError(f"ranks {failed} died (exit codes {codes})", rank=failed[0])
        rank = errors[0]
        blob, text = replies[rank][1]
        header = f"rank {rank} of {self.world_size} (failed ranks: {failed})"
        exc: BaseException | None = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:  # noqa: BLE001
                exc = None
        if exc is not None and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"[{header}] {exc.args[0]}",) + tuple(exc.args[1:])
        elif exc is None or not isinstance(exc, Exception):
            exc = DistributedTaskError(f"{header} raised:\n{text}", rank=rank)
        else:
            exc.args = (f"[{header}]",) + tuple(exc.args)
        exc.rank = rank  # type: ignore[attr-defined]
        exc.__cause__ = RemoteTraceback(f"\n--- traceback of {header} ---\n{text}")
        return exc

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        """Stop the workers (politely if they are idle, by force otherwise)."""
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if _POOLS.get(self.key) is self:
            _POOLS.pop(self.key)


_POOLS: dict[tuple[int, str, float], _Pool] = {}


def shutdown_pools() -> None:
    """Stop every worker pool of this process (also run at exit)."""
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    backend: str = "gloo", collective_timeout: float = _COLLECTIVE_TIMEOUT,
                    **kwargs: Any) -> list:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` ranks; return results by rank.

    `fn` must be a module-level function of an importable module (it is pickled by
    reference); arguments and results must pickle. The ranks share the default
    torch.distributed process group (`backend`: "gloo" on CPU, "nccl" on CUDA).

    Raises the exception of the lowest failing rank, its message prefixed with
    "[rank R of W ...]", its traceback text chained as `__cause__`, and `.rank` set.
    Raises TimeoutError when a rank does not answer within `timeout` seconds; the pool
    is then killed and a fresh one is started by the next call.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if getattr(fn, "__name__", "<lambda>") == "<lambda>" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            f"fn={fn!r} must be a module-level function (it is pickled by reference); "
            "move it to module scope"
        )
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    key = (world_size, backend, float(collective_timeout))
    pool = _POOLS.get(key)
    if pool is not None and not pool.alive():
        pool.close()
        pool = None
    if pool is None:
        pool = _Pool(world_size, backend, collective_timeout)
        _POOLS[key] = pool
    return pool.run(fn, args, kwargs, timeout)
