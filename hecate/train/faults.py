"""What a worker does when something goes wrong: named errors, stop requests, parent death,
the run-directory lock, and the one-line error report its launcher prints.

Everything here is imported by `python -m hecate.train` before torch, so it stays light.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback

# A worker that stopped on SIGTERM/SIGINT after saving a checkpoint exits with this code,
# so the launcher can tell "stopped on request" from "finished" and from "failed".
EXIT_STOPPED = 143
# Exit code of a run that failed with an error the user can act on (one line printed).
EXIT_ERROR = 2


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was NaN/inf and train.on_nonfinite says stop (or too many skips)."""


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within train.collective_timeout_s."""


class PeerFailedError(RuntimeError):
    """Another rank failed first; this rank stops too (its launcher reports the other's error)."""


class RunDirInUseError(RuntimeError):
    """Another run holds the lock on train.out_dir."""


def user_error_types() -> tuple[type, ...]:
    """Errors whose message says what to fix: printed as one line, never restarted."""
    from hecate.comm.agreement import AgreementError
    from hecate.train.checkpoint_io import CheckpointError

    return (ValueError, TypeError, CheckpointError, AgreementError, NonFiniteError, CollectiveTimeoutError,
            RunDirInUseError)


# ---- stop requests (SIGTERM / SIGINT) ---------------------------------------------------------
class StopRequest:
    """Records SIGTERM/SIGINT instead of dying mid-step: the trainer finishes the step, agrees with
    the other ranks that someone was asked to stop, saves a checkpoint and exits. A second
    SIGINT (an impatient Ctrl-C) restores the default handler, so a third one kills."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. under tests)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ---- parent death --------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None, sig: int = signal.SIGTERM) -> str:
    """Ask the kernel to send `sig` to this process when its parent (the launcher) dies.

    Linux: prctl(PR_SET_PDEATHSIG) via ctypes; elsewhere a daemon thread polls getppid().
    SIGTERM (not SIGKILL): the ranks then stop together after the current step and save.
    Returns the mechanism used. If the parent is already gone, the signal is sent at once.
    """
    how = "watchdog"
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            how = "watchdog"
    parent = expected_parent if expected_parent is not None else os.getppid()
    if how == "watchdog":
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, name="hecate-parent-watchdog", daemon=True).start()
    elif os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), sig)
    return how


# ---- the run directory lock ----------------------------------------------------------------------
LOCK_FILE = ".hecate.lock"


class RunLock:
    """An exclusive flock on OUT_DIR/.hecate.lock for the life of a run (released by the kernel
    when the holder exits, even on SIGKILL). A second run on the same out_dir fails at once."""

    def __init__(self, out_dir) -> None:
        self.path = os.path.join(os.fspath(out_dir), LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunDirInUseError(
                f"train.out_dir={os.path.dirname(self.path)} is in use by another run ({holder}); "
                "wait for it to finish or choose another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


# ---- reporting a worker's error ------------------------------------------------------------------
def one_line(exc: BaseException) -> str:
    """The error as one line: user errors by their message, others with their type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, user_error_types()):
        return text
    return f"{type(exc).__name__}: {text}"


def report_worker_error(exc: BaseException) -> int:
    """Record this rank's error for the launcher (HECATE_ERROR_DIR) or print it as one line
    (under torchrun); returns the worker's exit code."""
    rank = int(os.environ.get("RANK", "0"))
    user = isinstance(exc, user_error_types())
    record = {"rank": rank, "time": time.time(), "type": type(exc).__name__, "message": one_line(exc),
              "user_error": user, "secondary": isinstance(exc, PeerFailedError),
              "traceback": "" if user or isinstance(exc, PeerFailedError) else traceback.format_exc()}
    error_dir = os.environ.get("HECATE_ERROR_DIR")
    if error_dir:
        path = os.path.join(error_dir, f"rank_{rank:05d}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    else:
        print(f"hecate train: error: rank {rank}: {record['message']}", file=sys.stderr, flush=True)
        if not user:
            print(record["traceback"], file=sys.stderr, flush=True)
    return EXIT_ERROR


def read_worker_errors(error_dir: str) -> dict[int, dict]:
    """{rank: record} of the error files written by report_worker_error."""
    return _read_rank_records(error_dir, "rank_")


def _read_rank_records(error_dir: str, prefix: str) -> dict[int, dict]:
    """{rank: record} of the `prefix`*.json files in error_dir; a file half-written or unreadable
    (a rank killed while writing) is skipped, as if absent."""
    out = {}
    if not os.path.isdir(error_dir):
        return out
    for name in os.listdir(error_dir):
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                with open(os.path.join(error_dir, name)) as f:
                    rec = json.load(f)
                out[int(rec["rank"])] = rec
            except (OSError, ValueError, KeyError):
                continue
    return out


# ---- NCCL collective timeouts ----------------------------------------------------------------------
# On gloo a collective that runs past train.collective_timeout_s raises in the waiting rank, and the
# trainer turns it into a CollectiveTimeoutError naming the step, the layer and the missing ranks. On
# NCCL, torch's watchdog thread finds the overdue collective instead: it logs "[Rank r] Watchdog caught
# collective operation timeout: WorkNCCL(SeqNum=.., OpType=.., .., Timeout(ms)=..)" and, under
# TORCH_NCCL_ASYNC_ERROR_HANDLING 1 or 3 (3 is torch's default: tear the process down without aborting
# the communicators), rethrows in that thread, which ends the process with SIGABRT. No Python code of the
# rank runs after it, so the rank records its timeout for its launcher at start-up, and the launcher,
# seeing the rank die of SIGABRT, prints the named message (launch.py).
TIMEOUT_KEY = "train.collective_timeout_s"
NCCL_RECORD = "nccl_rank_{rank:05d}.json"


def nccl_watchdog_env(environ: dict, trace_prefix: str | None = None) -> list[str]:
    """Set, where the user has not, what ProcessGroupNCCL reads when it is created; returns warnings.

    - TORCH_NCCL_ASYNC_ERROR_HANDLING=3: a timed-out collective ends the process (torch's default,
      made explicit; a value under the older name NCCL_ASYNC_ERROR_HANDLING, which torch still
      reads, is left alone); 0 (no handling) leaves the rank hanging forever, 2 (abort the
      communicators only) lets it run on with the data of an unfinished collective: both are warned about.
    - TORCH_NCCL_DUMP_ON_TIMEOUT=1 with TORCH_NCCL_TRACE_BUFFER_SIZE=2000 (the dump needs a buffer):
      before the abort the watchdog writes torch's flight recorder (the last collectives of the rank)
      to TORCH_NCCL_DEBUG_INFO_TEMP_FILE + rank, here `trace_prefix` + rank when given. The newer
      spellings TORCH_FR_BUFFER_SIZE / TORCH_FR_DUMP_TEMP_FILE take precedence in torch when set.
    """
    warnings = []
    # torch reads the older spelling NCCL_ASYNC_ERROR_HANDLING when the new one is unset: a user's
    # value there is their setting, which setting the new name would silently override.
    name = next((n for n in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING") if n in environ),
                "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    environ.setdefault(name, "3")
    mode = environ[name].strip()
    if mode in ("0", "2"):
        what = ("a collective that never completes hangs the rank forever" if mode == "0" else
                "a timed-out collective aborts the communicators but the rank runs on with its unfinished data")
        warnings.append(f"{name}={mode}: {what}; unset it (or set 3) so that a "
                        f"collective past {TIMEOUT_KEY} ends the run with a named error")
    environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if "TORCH_FR_BUFFER_SIZE" not in environ:
        environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    if trace_prefix and "TORCH_FR_DUMP_TEMP_FILE" not in environ:
        environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", trace_prefix)
    return warnings


def record_nccl_rank(rank: int, timeout_s: float, environ: dict | None = None) -> str | None:
    """Tell the launcher (HECATE_ERROR_DIR) that this rank runs NCCL collectives bounded by timeout_s,
    and where its flight-recorder dump would go. Returns the record's path (None without a launcher)."""
    environ = os.environ if environ is None else environ
    error_dir = environ.get("HECATE_ERROR_DIR")
    if not error_dir:
        return None
    trace = environ.get("TORCH_FR_DUMP_TEMP_FILE") or environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    record = {"rank": rank, "collective_timeout_s": timeout_s, "trace": f"{trace}{rank}" if trace else None,
              "started": time.time()}
    path = os.path.join(error_dir, NCCL_RECORD.format(rank=rank))
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return path


def read_nccl_records(error_dir: str) -> dict[int, dict]:
    """{rank: record} written by record_nccl_rank."""
    return _read_rank_records(error_dir, "nccl_rank_")


def nccl_abort_message(rank: int, record: dict, still_running: list[int] = ()) -> str:
    """The launcher's line for a rank of an NCCL run that died of SIGABRT (see the note above)."""
    timeout = record.get("collective_timeout_s")
    setting = f"{TIMEOUT_KEY}={timeout:g}s" if isinstance(timeout, (int, float)) else TIMEOUT_KEY
    trace = record.get("trace")
    dumped = bool(trace) and os.path.isfile(trace) and os.path.getmtime(trace) >= record.get("started", 0)
    if dumped:
        # The watchdog writes the dump only when it caught a timeout or an NCCL error.
        head = (f"rank {rank}: NCCL's watchdog ended the process (SIGABRT): a collective did not complete "
                f"within {setting} or NCCL failed")
        where = f"its 'Watchdog caught collective operation timeout' line above names the collective; " \
                f"flight recorder: {trace}"
    else:
        head = (f"rank {rank} was killed by SIGABRT: on NCCL that is how torch's watchdog ends a rank whose "
                f"collective did not complete within {setting}")
        where = ("look above for its 'Watchdog caught collective operation timeout' line, which names the "
                 "collective; without that line the abort had another cause, named in the rank's output above "
                 "(the watchdog also rethrows CUDA errors, such as a device-side assert)")
    running = (f"; ranks {list(still_running)} were still running when the launcher stopped the group"
               if still_running else "")
    return (f"{head} ({where}){running}. If a step legitimately takes longer, raise {TIMEOUT_KEY}; "
            "otherwise a rank stopped, hung or died before the collective")


# ---- fault injection for tests -------------------------------------------------------------------
def injected_fault(rank: int, step: int) -> None:
    """HECATE_FAULT="ACTION:RANK:STEP" (tests only): at the start of STEP on RANK, ACTION is
    `raise` (a RuntimeError), `stop` (SIGSTOP itself: a hung rank), `kill` (SIGKILL itself) or
    `term` (SIGTERM itself: a preemption notice)."""
    spec = os.environ.get("HECATE_FAULT")
    if not spec or os.environ.get("HECATE_ATTEMPT", "0") != "0":  # a restarted group runs clean
        return
    action, r, s = spec.split(":")
    if int(r) != rank or int(s) != step:
        return
    if action == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
