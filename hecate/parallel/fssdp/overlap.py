"""FSSDP's asynchronous sparse collectives (the transport is hecate.comm.sparse).

Both move only replicas: a rank computes with the rows it owns in place, so an spAG
brings it just the chunks it holds but does not own, and an spRS sends just those
chunks' gradients back to their owners.

PendingReduce: the backward of layer l issues its spRS without waiting and the autograd
engine continues with layer l-1 while the transport (gloo's thread pool, or NCCL's
stream) moves the gradients. ReduceQueue keeps them in issue order (identical on every
rank) and completes them (adds the rows into the owners' gradients, frees the send and
receive buffers): those already done at the start of each later layer's backward, without
waiting, and all the rest at the end of the backward pass (an autograd engine callback),
so no spRS buffer is alive when the step's dense gradient sync and `finish_backward` run.
PendingGather: an spAG issued early (forward prefetch, backward re-gather). Each `wait()`
reports how long the host blocked, i.e. on gloo the part of the exchange that compute did not
hide; on NCCL `wait()` only makes the current stream wait (the host does not block), and the
callers time it with CUDA events instead (clock.timed).
"""
from __future__ import annotations

from collections import deque

import torch

from hecate.comm.all_to_all import group_ranks
from hecate.comm.sparse import SparsePlan, start_replica_gather, start_replica_reduce


class PendingReduce:
    """A layer's spRS; `wait()` returns (the owned rows' summed gradients, seconds blocked).

    grads_RS: this rank's gradient of each replica it held (rows in plan.recv_ids order);
    owned_grads_OS: its own gradient of the chunks it owns, into which the other holders'
    rows are added (ascending rank) when the exchange completes.
    """

    def __init__(self, layer, grads_RS: torch.Tensor, owned_grads_OS: torch.Tensor, plan: SparsePlan,
                 group, stats, name: str = "fssdp.spRS", async_op: bool = True):
        self.layer = layer
        if stats is not None:
            row = grads_RS.shape[1] * grads_RS.element_size()  # the wire dtype
            stats.record_peers(name, [n * row for n in plan.recv_counts],
                               [n * row for n in plan.send_counts], plan.rank, group_ranks(group))
        self._pending = start_replica_reduce(grads_RS, owned_grads_OS, plan, group, async_op=async_op)

    def wait(self) -> tuple[torch.Tensor, float]:
        return self._pending.wait()

    def is_completed(self) -> bool:
        """Whether the exchange has finished (wait() would not block the host); never blocks.
        On NCCL: the collective's kernels have run (an event query)."""
        work = self._pending._work  # None once waited on, or for a blocking exchange
        return work is None or work.is_completed()


class ReduceQueue:
    """The spRS issued by backward and not yet completed, in issue order.

    `complete(reduce)` waits for one and adds its rows into the owner's gradient (the
    strategy's); it is called in issue order only. `add` queues a reduce and asks the autograd
    engine to `drain` the queue when the backward pass ends (the first such callback completes
    them all, the others find it empty; a pass that raises runs none, and the next forward's
    drain_reduces or finish_backward completes what is left); `reap` completes the queue's
    head while its exchanges have finished, without waiting."""

    def __init__(self, complete):
        self._items: deque = deque()
        self._complete = complete

    def __len__(self) -> int:
        return len(self._items)

    def add(self, reduce: PendingReduce) -> None:
        self._items.append(reduce)
        torch.autograd.Variable._execution_engine.queue_callback(self.drain)

    def reap(self) -> None:
        while self._items and self._items[0].is_completed():
            self._complete(self._items.popleft())

    def drain(self) -> None:
        while self._items:  # one at a time: if one raises, the rest stay queued
            self._complete(self._items.popleft())


class PendingGather:
    """An spAG of the replicas in `plan` (issued ahead of time, or at once and waited on).

    The layer that uses it must compute with exactly this plan's holders.
    `wait()` returns (replicas_RS in plan.recv_ids order, seconds blocked).
    """

    def __init__(self, owned_OS: torch.Tensor, plan: SparsePlan, holders_WE, group, stats,
                 name: str = "fssdp.spAG", async_op: bool = True, wire_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None):
        self.plan, self.holders_WE, self.wire_dtype = plan, holders_WE, wire_dtype
        if stats is not None:
            row = owned_OS.shape[1] * (wire_dtype or owned_OS.dtype).itemsize
            stats.record_peers(name, [n * row for n in plan.send_counts],
                               [n * row for n in plan.recv_counts], plan.rank, group_ranks(group))
        self._pending = start_replica_gather(owned_OS.detach(), plan, group, async_op=async_op,
                                             wire_dtype=wire_dtype, out=out)

    def wait(self) -> tuple[torch.Tensor, float]:
        return self._pending.wait()
