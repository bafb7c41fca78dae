"""Record the torch.distributed collectives a block of code issues (names, in call order)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather_into_tensor", "all_gather_single",
               "all_gather", "all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast",
               "send", "recv", "isend", "irecv", "barrier")


@contextlib.contextmanager
def spy_collectives(names=COLLECTIVES, sizes: bool = False):
    """Yields the list the calls are appended to (name, or (name, tensor numels) with sizes);
    the originals are restored on exit."""
    calls: list = []
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, tuple(a.numel() for a in args if torch.is_tensor(a))) if sizes else name)
            return fn(*args, **kwargs)
        return wrapper

    for n, fn in originals.items():
        setattr(dist, n, counting(n, fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)


def layer_step(layer, x, g):
    """One MoE layer's forward + backward + finish_backward under the spy; returns (out, calls)."""
    with spy_collectives() as calls:
        out = layer(x)
        ((out.y * g).sum() + out.aux_loss).backward()
        layer.strategy.finish_backward([layer])
    return out, calls
