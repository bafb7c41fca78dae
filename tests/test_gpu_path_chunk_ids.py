"""Out-of-range chunk ids in the compiled chunk ops: the CPU op raises, the CUDA op must too.

The CUDA kernels used to skip such ids silently (the send buffer kept garbage, a received
chunk was dropped). Now a bad id fails a device-side assert in the kernel (no extra launch, no
host read on the hot path) or, under HECATE_SYNC_CHECKS=1, raises the CPU op's ValueError
before anything is written. The CPU test runs everywhere; the CUDA ones are gpu-marked.
"""
import os
import subprocess
import sys

import pytest
import torch

import hecate.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["pack_chunks", "unpack_chunks", "scatter_add_chunks"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def call(name, ids, C=4, S=3, device="cpu"):
    """Runs op `name` of hecate._C on (C, S) chunks with `ids`; returns the buffer it writes."""
    op = getattr(torch.ops.hecate, name)
    buffer = torch.arange(C * S, dtype=torch.float32, device=device).reshape(C, S)
    ids = torch.tensor(ids, dtype=torch.int64, device=device)
    if name == "pack_chunks":
        return op(buffer, ids)
    op(torch.ones(len(ids), S, device=device), ids, buffer)
    return buffer


def bad_id_message(name, ids, C=4, S=3):
    with pytest.raises(ValueError) as caught:
        call(name, ids, C, S)
    return str(caught.value)


@pytest.mark.parametrize("name", OPS)
def test_cpu_op_names_the_bad_id(name):
    assert ops.extension_available(), "hecate._C is not built: run `make build`"
    assert "chunk_ids_n[1] = 9 is out of range for 4 chunks" in bad_id_message(name, [0, 9])
    assert "chunk_ids_n[0] = -1 is out of range for 4 chunks" in bad_id_message(name, [-1, 2])
    assert "chunk_ids_n[0] = 0 is out of range for 0 chunks" in bad_id_message(name, [0], C=0)
    # Valid ids still work (pack of [3, 0] on a 4 x 3 arange buffer: rows 3 and 0).
    if name == "pack_chunks":
        assert call(name, [3, 0]).tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("S", [3, 0])  # S == 0 launches no kernel: the op checks the ids itself
@pytest.mark.parametrize("ids", [[0, 9], [-1, 2]])
def test_cuda_op_raises_the_cpu_error_under_sync_checks(monkeypatch, name, S, ids):
    monkeypatch.setenv("HECATE_SYNC_CHECKS", "1")
    expected = bad_id_message(name, ids, S=S).splitlines()[0]
    op = getattr(torch.ops.hecate, name)
    before = torch.arange(4 * S, dtype=torch.float32).reshape(4, S)
    buffer, bad = before.to("cuda"), torch.tensor(ids, device="cuda")
    with pytest.raises(ValueError) as caught:
        if name == "pack_chunks":
            op(buffer, bad)
        else:
            op(torch.ones(len(ids), S, device="cuda"), bad, buffer)
    assert str(caught.value).splitlines()[0] == expected
    assert torch.equal(buffer.cpu(), before)  # raised before the launch: nothing written


@pytest.mark.gpu
@needs_cuda
def test_cuda_ops_with_valid_ids_read_nothing_back(monkeypatch):
    # The hot path: no host sync (torch raises on one in sync debug mode "error"). The inputs are
    # made first: copying ids from the host is a synchronizing copy of its own.
    monkeypatch.delenv("HECATE_SYNC_CHECKS", raising=False)
    hecate = torch.ops.hecate
    buffer = torch.arange(12, dtype=torch.float32, device="cuda").reshape(4, 3)
    out_a, out_b = buffer.clone(), buffer.clone()
    ids_pack, ids_unpack, ids_add = (torch.tensor(i, device="cuda") for i in ([3, 0, 3], [3, 0], [1, 1]))
    ones = torch.ones(2, 3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed = hecate.pack_chunks(buffer, ids_pack)
        hecate.unpack_chunks(ones, ids_unpack, out_a)
        hecate.scatter_add_chunks(ones, ids_add, out_b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert packed.cpu().tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0], [9.0, 10.0, 11.0]]
    assert out_a.cpu()[[0, 3]].tolist() == [[1.0] * 3, [1.0] * 3]
    assert out_b.cpu()[1].tolist() == [5.0, 6.0, 7.0]


# Without HECATE_SYNC_CHECKS the check is a device-side assert, which leaves the process's CUDA
# context unusable: each case runs in a process of its own.
_ASYNC = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_gpu_path_chunk_ids import call
call({name!r}, [0, 1], S={S}, device="cuda")
torch.cuda.synchronize()
print("valid ok", flush=True)
call({name!r}, [0, 9], S={S}, device="cuda")
torch.cuda.synchronize()
print("bad id passed", flush=True)
"""


# One process each (a few seconds of CUDA start-up): the pack kernel, a column kernel, and the
# op-side check of empty rows (unpack_chunks' column kernel is scatter_add's loop with a copy).
@pytest.mark.parametrize("name, S", [("pack_chunks", 3), ("scatter_add_chunks", 1000), ("unpack_chunks", 0)])
@pytest.mark.gpu
@needs_cuda
def test_cuda_op_bad_id_stops_at_the_next_sync(name, S):
    env = {k: v for k, v in os.environ.items() if k != "HECATE_SYNC_CHECKS"}
    proc = subprocess.run([sys.executable, "-c", _ASYNC.format(root=ROOT, name=name, S=S)],
                          capture_output=True, text=True, timeout=50, env=env, cwd=ROOT)
    assert "valid ok" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0 and "bad id passed" not in proc.stdout, proc.stdout
    assert "assert" in proc.stderr.lower(), proc.stderr[-3000:]
