"""Chooses, per call, between the compiled torch.ops.hecate kernels and the PyTorch reference."""
from __future__ import annotations

import functools
import warnings

import torch

from hecate import _extension

# Device types on which running the reference is expected and silent: the CPU (a machine
# without the built extension runs it, as docs/build.md says) and the meta device (shapes only).
_QUIET_DEVICE_TYPES = ("cpu", "meta")
_warned: set = set()


def extension_available() -> bool:
    """Whether hecate._C is built and its operators are registered."""
    return _extension.load()


@functools.lru_cache(maxsize=None)
def _has_kernel(op_name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"hecate::{op_name}", dispatch_key)


def use_extension(op_name: str, device: torch.device) -> bool:
    """True when hecate._C has a kernel for `op_name` on `device` (else the reference runs)."""
    if not extension_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and _has_kernel(op_name, key)


def reference_runs(op_name: str, device: torch.device) -> None:
    """Called by an op that runs its plain-PyTorch reference on `device`: on an accelerator,
    say so once per op and device type. The reference is much slower on a GPU (it reads values
    back to the host and materializes what the kernels fuse), and it runs there only when the
    extension was built without CUDA (HECATE_NO_CUDA=1, no nvcc) or not at all: a run should
    not find that out from its step time."""
    if device.type in _QUIET_DEVICE_TYPES or (op_name, device.type) in _warned:
        return
    _warned.add((op_name, device.type))
    why = "has no kernel for this device type" if extension_available() else "is not built"
    warnings.warn(f"hecate.ops {op_name} on {device.type}: hecate._C {why}, so the plain-PyTorch reference "
                  "runs (much slower on a GPU: host reads, no fused kernel); rebuild with `make build` on a "
                  "machine with nvcc and without HECATE_NO_CUDA=1 (docs/build.md)", RuntimeWarning, stacklevel=3)


def op(op_name: str):
    return getattr(torch.ops.hecate, op_name)
