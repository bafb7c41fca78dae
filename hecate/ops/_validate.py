"""Input checks shared by the public op functions: each raises a ValueError naming the argument."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def tensor(name: str, value, ndim: int, *, integer: bool = False, floating: bool = False,
           boolean: bool = False) -> None:
    """`value` is a tensor with `ndim` dimensions and the requested dtype family."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if integer and value.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 (torch.long), got {value.dtype}; convert with .long()")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if boolean and value.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {value.dtype}")


def shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}")


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")


def integer(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def below(name: str, values: torch.Tensor, limit: int, what: str, allow_negative: bool) -> None:
    """Every entry of `values` is < limit (and >= 0 unless negatives mean 'unused').

    On the CPU the check names the offending value. On an accelerator reading a value back
    would stall the stream on every op call, so the check is queued on the device instead
    (torch._assert_async: a bad index stops the program with this message at the next
    synchronization); HECATE_SYNC_CHECKS=1 gives the immediate, CPU-style error there too.
    """
    if values.numel() == 0:
        return
    if not host_reads_free(values.device) and not sync_checks():
        ok = (values < limit).all()
        if not allow_negative:
            ok = ok & (values >= 0).all()
        lower = "" if allow_negative else "0 <= "
        torch._assert_async(ok, f"{name} has an entry outside {lower}{name} < {what} = {limit}")
        return
    hi = int(values.max())
    if hi >= limit:
        raise ValueError(f"{name} contains {hi}, out of range for {what} = {limit}")
    if not allow_negative:
        lo = int(values.min())
        if lo < 0:
            raise ValueError(f"{name} contains {lo}; entries must be in [0, {limit})")


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor's values on `device` costs no synchronization (the host)."""
    return device.type == "cpu"


def sync_checks() -> bool:
    """HECATE_SYNC_CHECKS=1: range checks on accelerators read values back (slow, precise)."""
    import os

    return os.environ.get("HECATE_SYNC_CHECKS", "0") not in ("", "0")
