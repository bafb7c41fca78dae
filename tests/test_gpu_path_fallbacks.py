"""An accelerator op without a compiled kernel runs the plain-PyTorch reference: said once per
op and device type, not found out from the step time. This CPU-only build has no CUDA kernel,
the case of a GPU machine whose extension was built with HECATE_NO_CUDA=1 or without nvcc."""
import inspect
import re
import warnings

import pytest
import torch

from hecate import ops
from hecate.ops import _backend, attention


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())


def test_the_reference_on_cuda_warns_once(fresh):
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match=r"permute on cuda: hecate._C (has no kernel|is not built).*reference"):
        _backend.reference_runs("permute", cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.reference_runs("permute", cuda)  # once per op and device type
        _backend.reference_runs("permute", torch.device("cpu"))
        _backend.reference_runs("permute", torch.device("meta"))


def test_an_op_face_warns_when_it_falls_back(fresh, monkeypatch):
    # The meta device stands in for an accelerator without kernels (it is quiet by default).
    monkeypatch.setattr(_backend, "_QUIET_DEVICE_TYPES", ("cpu",))
    with pytest.warns(RuntimeWarning, match="pack_chunks on meta"):
        ops.pack_chunks(torch.empty(4, 8, device="meta"), torch.tensor([0, 2]).to("meta"))


def test_every_op_face_says_when_it_falls_back():
    # Each face picks the kernel for its tensor's device; each fallback branch must call
    # reference_runs for that op and device (pack_chunks above shows one that does).
    for module in (ops, attention):
        src = inspect.getsource(module)
        choices = re.findall(r'if not use_extension\(("\w+", \w+\.device)\):\n\s+(.*)\n', src)
        assert choices and all(line == f"reference_runs({args})" for args, line in choices), choices


def test_cpu_calls_stay_quiet(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.pack_chunks(torch.randn(4, 8), torch.tensor([0, 2]))
        ops.permute(torch.randn(4, 3), torch.tensor([[0, 1]] * 4), 2)
