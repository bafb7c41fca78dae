"""faults.nccl_watchdog_env must not override a user's setting given under torch's older
spelling NCCL_ASYNC_ERROR_HANDLING, which torch still reads (after TORCH_NCCL_ASYNC_ERROR_HANDLING:
setting the new name would silently win over it)."""
from hecate.train.faults import nccl_watchdog_env


def test_the_legacy_spelling_is_the_users_setting():
    env = {"NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert nccl_watchdog_env(env) == []
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env and env["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    env = {"NCCL_ASYNC_ERROR_HANDLING": "0"}
    (warning,) = nccl_watchdog_env(env)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env
    assert warning.startswith("NCCL_ASYNC_ERROR_HANDLING=0: a collective that never completes hangs"), warning
    # Both given: torch reads the new name, so that is the one judged (and kept).
    env = {"NCCL_ASYNC_ERROR_HANDLING": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert nccl_watchdog_env(env) == [] and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_the_sigabrt_line_does_not_claim_a_timeout_it_has_no_evidence_of():
    # Without a flight-recorder dump, SIGABRT may also be the watchdog rethrowing a CUDA error
    # (a device-side assert of the chunk ops, say): the line must say where to tell them apart.
    from hecate.train.faults import nccl_abort_message

    line = nccl_abort_message(1, {"collective_timeout_s": 30.0, "trace": None, "started": 0})
    assert line.startswith("rank 1 was killed by SIGABRT: on NCCL that is how torch's watchdog ends a rank")
    assert "without that line the abort had another cause" in line and "device-side assert" in line
