"""FSSDP's asynchronous sparse collectives (the transport is hecate.comm.sparse).

PendingReduce: the backward of layer l issues its spRS without waiting and the autograd
engine continues with layer l-1 while the transport (gloo's thread pool, or NCCL's
stream) moves the gradients; `finish_backward` waits for every pending reduce in issue
order (identical on every rank) and adds the rows into the owners' gradients.
PendingGather: an spAG issued early (forward prefetch, backward re-gather). Each `wait()`
reports how long it blocked, i.e. the part of the exchange that compute did not hide.
"""
from __future__ import annotations

import torch

from hecate.comm.sparse import plan_sparse, start_spag, start_sprs


class PendingReduce:
    """A layer's spRS in flight; `wait()` returns (owned gradient rows, seconds blocked)."""

    def __init__(self, layer, grads_MS: torch.Tensor, owner_E, holders_WE, rank: int, group, stats,
                 name: str = "fssdp.spRS"):
        plan = plan_sparse(owner_E, holders_WE, rank)
        self.layer = layer
        if stats is not None:
            row = grads_MS.shape[1] * grads_MS.element_size()
            stats.record(name, sum(plan.recv_counts) * row, sum(plan.send_counts) * row)
        self._pending = start_sprs(grads_MS, plan, group, async_op=True)

    def wait(self) -> tuple[torch.Tensor, float]:
        return self._pending.wait()


class PendingGather:
    """An spAG issued ahead of time (while the next block's attention computes).

    `holders_WE` is fixed when the gather is issued; the layer's plan must use it.
    `wait()` returns (materialized_MS, seconds blocked).
    """

    def __init__(self, owned_OS: torch.Tensor, owner_E, holders_WE, rank: int, group, stats,
                 name: str = "fssdp.spAG"):
        plan = plan_sparse(owner_E, holders_WE, rank)
        self.holders_WE = holders_WE
        if stats is not None:
            row = owned_OS.shape[1] * owned_OS.element_size()
            stats.record(name, sum(plan.send_counts) * row, sum(plan.recv_counts) * row)
        self._pending = start_spag(owned_OS.detach(), plan, group, async_op=True)

    def wait(self) -> tuple[torch.Tensor, float]:
        return self._pending.wait()
