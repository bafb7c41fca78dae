"""Chooses, per call, between the compiled torch.ops.hecate kernels and the PyTorch reference."""
from __future__ import annotations

import functools

import torch

from hecate import _extension


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


def op(op_name: str):
    return getattr(torch.ops.hecate, op_name)
