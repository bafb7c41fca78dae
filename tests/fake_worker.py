"""A stand-in rank for launcher tests (no torch: starts in milliseconds).

FAKE_MODE: `ok` exits 0; `fail1` rank 1 reports an error and exits 2 while rank 0 hangs;
`sigkill1` rank 1 SIGKILLs itself on the first attempt; `term` waits for SIGTERM then exits
143; `sleep` just sleeps. Every rank appends "attempt rank args" to FAKE_LOG.
"""
import os
import signal
import sys
import time

from hecate.train.faults import EXIT_STOPPED, die_with_parent, report_worker_error

if __name__ == "__main__":
    die_with_parent(int(os.environ["HECATE_LAUNCHER_PID"]))
    rank, attempt, mode = int(os.environ["RANK"]), os.environ["HECATE_ATTEMPT"], os.environ["FAKE_MODE"]
    got = []
    if mode == "term":
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{attempt} {rank} {os.getpid()} {' '.join(sys.argv[1:])}\n")
    if "yaml" in sys.modules or os.environ.get("FAKE_IMPORT_YAML"):
        import yaml  # noqa: F401 - must be PyYAML, never a yaml.py from the working directory
    if mode == "ok":
        sys.exit(0)
    if mode == "fail1":
        if rank == 1:
            time.sleep(0.2)
            sys.exit(report_worker_error(ValueError("model.moe.top_k=9 exceeds num_experts=4")))
        time.sleep(60)
    if mode == "sigkill1":
        if rank == 1 and attempt == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)
    if mode == "term":
        deadline = time.time() + 30
        while not got and time.time() < deadline:
            time.sleep(0.05)
        sys.exit(EXIT_STOPPED if got else 1)
    time.sleep(60)
