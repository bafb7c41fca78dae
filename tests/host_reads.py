"""Count the host reads of device data a piece of code makes, on a CPU-only machine.

On a GPU every read of a device tensor's values by the host (`.item()`, `.tolist()`,
`.cpu()`, `bool(t)`, `nonzero`, boolean-mask indexing, `bincount`, ...) stalls the
host until the stream has caught up: a device-to-host synchronization. On a CPU
nothing distinguishes device data from host data, so `HostReadCounter` keeps that
distinction itself while the code runs under it (a TorchFunctionMode):

- host tensors: results of downloads (`.cpu()`, `.to("cpu")`), of calls without tensor
  inputs or a `device=` argument (`torch.tensor([...])`, `torch.zeros(n)`, `from_numpy`), of ops whose
  tensor inputs are all host tensors, and the tensors registered with `mark_host`
  (state that already lived on the host before the counted code ran);
- device tensors: everything else (model inputs, parameters, gradients made by the
  autograd engine, factories given a `device=`, uploads with `.to(device)`).

A read is a call of one of READS (or a boolean-mask index, or `repeat_interleave`
without `output_size`) on a device tensor. The counter records each with the line of
hecate code that made it, so a test can hold code to a budget and say where reads are.
Code that branches on `tensor.device.type == "cpu"` to read values only where it is
free must be steered onto its device branch by the test (see tests/test_host_syncs.py).
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostReadCounter"]

T = torch.Tensor
READS = {
    T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy,
    T.nonzero, torch.nonzero, torch.argwhere, T.argwhere, T.masked_select, torch.masked_select,
    torch.bincount, T.bincount, torch.unique, T.unique, torch.unique_consecutive,
    torch.equal, T.equal, torch.allclose, T.allclose,
}
DOWNLOADS = {T.cpu, T.numpy, T.tolist}


def _tensors(args, kwargs):
    flat, _ = tree_flatten((args, kwargs or {}))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu" and not isinstance(device, torch.device)


def _to_target(args, kwargs):
    """The device argument of Tensor.to(...), or None when it only changes the dtype."""
    if "device" in (kwargs or {}):
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return a
        if isinstance(a, torch.Tensor):  # .to(other): take other's side
            return a
    return None


class HostReadCounter(TorchFunctionMode):
    """`with HostReadCounter() as c: ...` then `c.count`, `c.where` (Counter of call sites)."""

    def __init__(self, mark_host=()):
        super().__init__()
        self._host: dict = {}  # id -> weakref (tensors compare elementwise: no WeakSet)
        self.count = 0
        self.where: Counter = Counter()
        for t in mark_host:
            self.mark_host(t)

    # ---- tags -----------------------------------------------------------------------------
    def mark_host(self, obj, _seen=None) -> None:
        """Register every tensor reachable from `obj` (tensors, containers, plain objects'
        attributes; not nn.Modules) as host data."""
        seen = set() if _seen is None else _seen
        if id(obj) in seen or isinstance(obj, torch.nn.Module):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, torch.nn.Parameter):
                self._add(obj)
            return
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            items = obj
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            items = vars(obj).values()
        else:
            return
        for v in list(items):
            self.mark_host(v, seen)

    def _add(self, t: torch.Tensor) -> None:
        self._host[id(t)] = weakref.ref(t)

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _tag(self, out, host: bool) -> None:
        if not host:
            return
        for t in _tensors((out,), None):
            self._add(t)

    # ---- the mode ---------------------------------------------------------------------------
    def __enter__(self):
        # The autograd engine runs Python backward functions without the caller's function
        # modes: re-enter this one around each of them so backward reads are counted too.
        from torch.autograd.function import BackwardCFunction

        self._nest = getattr(self, "_nest", 0) + 1
        if self._nest == 1:
            counter, original = self, BackwardCFunction.apply
            self._original_apply = original

            def apply(ctx, *args):
                with counter:
                    return original(ctx, *args)

            BackwardCFunction.apply = apply
            # torch.from_numpy bypasses function modes; its result is host data.
            self._original_from_numpy = from_numpy = torch.from_numpy

            def host_from_numpy(array):
                t = from_numpy(array)
                counter._add(t)
                return t

            torch.from_numpy = host_from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.autograd.function import BackwardCFunction

        self._nest -= 1
        if self._nest == 0:
            BackwardCFunction.apply = self._original_apply
            torch.from_numpy = self._original_from_numpy
        return super().__exit__(*exc)

    def _record(self, func) -> None:
        self.count += 1
        site = "?"
        for frame in reversed(traceback.extract_stack()[:-3]):
            if "/hecate/" in frame.filename:
                site = f"{frame.filename.split('/hecate/')[-1]}:{frame.lineno} {frame.line}"
                break
        self.where[f"{getattr(func, '__name__', func)} at {site}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors(args, kwargs)
        device_inputs = [t for t in inputs if not self.is_host(t)]
        reads = func in READS
        if func is T.__getitem__ and len(args) > 1:
            index = _tensors((args[1],), None)
            reads = any(i.dtype == torch.bool for i in index)
        elif func in (torch.repeat_interleave, T.repeat_interleave):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            reads = isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        download = func in DOWNLOADS
        upload = False
        if func is T.to:
            target = _to_target(args, kwargs)
            if isinstance(target, torch.Tensor):
                upload = not self.is_host(target)
                download = not upload
            elif target is not None:
                download = _is_cpu(target)
                upload = not download
        if (reads or download) and device_inputs and inputs and not self.is_host(inputs[0]):
            self._record(func)
        out = func(*args, **kwargs)
        if download:
            host = True
        elif upload:
            host = False
        elif not inputs:  # a factory: host unless told where to put it
            host = kwargs.get("device") is None or _is_cpu(kwargs.get("device"))
        else:
            host = not device_inputs
        self._tag(out, host)
        return out
