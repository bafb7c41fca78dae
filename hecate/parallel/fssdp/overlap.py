"""Asynchronous spRS: a layer's gradient reduce runs while earlier layers' backward computes.

The backward of layer l issues its spRS as a non-blocking all-to-all and moves on;
the autograd engine continues with layer l-1 while the transport (gloo's thread
pool, or NCCL's stream) moves the gradients. `finish_backward` waits for every
pending reduce, in issue order (identical on every rank), and adds the received
rows into the owners' gradients. `exposed_s` records how long those waits
blocked, i.e. the part of the reduce that compute did not hide.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from hecate import ops
from hecate.comm.sparse import plan_sparse


class PendingReduce:
    def __init__(self, layer, grads_MS: torch.Tensor, owner_E, holders_WE, rank: int, group, stats,
                 name: str = "fssdp.spRS"):
        plan = plan_sparse(owner_E, holders_WE, rank)
        device = grads_MS.device
        S = grads_MS.shape[1]
        self.layer, self.plan = layer, plan
        self._send = ops.pack_chunks(grads_MS, plan.recv_rows.to(device))
        self._recv = grads_MS.new_empty((sum(plan.send_counts), S))
        self._own = ops.pack_chunks(grads_MS, plan.owned_rows_M.to(device))  # own contribution
        if stats is not None:
            row = S * grads_MS.element_size()
            stats.record(name, sum(plan.recv_counts) * row, sum(plan.send_counts) * row)
        self._work = dist.all_to_all_single(self._recv, self._send, output_split_sizes=plan.send_counts,
                                            input_split_sizes=plan.recv_counts, group=group, async_op=True)

    def wait(self) -> tuple[torch.Tensor, float]:
        """Block until the rows arrived; return (owned gradient rows, seconds spent blocked)."""
        start = time.perf_counter()
        self._work.wait()
        blocked = time.perf_counter() - start
        ops.scatter_add_chunks(self._recv, self.plan.send_rows.to(self._recv.device), self._own)
        self._send = self._recv = None
        return self._own, blocked


class PendingGather:
    """An spAG issued ahead of time (while the next block's attention computes).

    `holders_WE` is fixed when the gather is issued; the layer's plan must use it.
    """

    def __init__(self, owned_OS: torch.Tensor, owner_E, holders_WE, rank: int, group, stats,
                 name: str = "fssdp.spAG"):
        plan = plan_sparse(owner_E, holders_WE, rank)
        device = owned_OS.device
        S = owned_OS.shape[1]
        self.holders_WE, self.plan = holders_WE, plan
        owned = owned_OS.detach()
        self._send = ops.pack_chunks(owned, plan.send_rows.to(device))
        self._recv = owned.new_empty((sum(plan.recv_counts), S))
        self._out = owned.new_empty((plan.held_ids.numel(), S))
        ops.unpack_chunks(owned, plan.owned_rows_M.to(device), self._out)
        if stats is not None:
            row = S * owned.element_size()
            stats.record(name, sum(plan.send_counts) * row, sum(plan.recv_counts) * row)
        self._work = dist.all_to_all_single(self._recv, self._send, output_split_sizes=plan.recv_counts,
                                            input_split_sizes=plan.send_counts, group=group, async_op=True)

    def wait(self) -> tuple[torch.Tensor, float]:
        """Block until the chunks arrived; return (materialized_MS, seconds spent blocked)."""
        start = time.perf_counter()
        self._work.wait()
        blocked = time.perf_counter() - start
        ops.unpack_chunks(self._recv, self.plan.recv_rows.to(self._recv.device), self._out)
        out, self._send, self._recv, self._out = self._out, None, None, None
        return out, blocked
