"""all_to_all_v: each rank sends a different number of rows to every other rank.

The transport is `all_to_all_single` with uneven split sizes (gloo and NCCL
both support it; the list form `all_to_all` fails on gloo with uneven sizes).
The backward pass is the mirror exchange: gradients travel back along the
same routes with send and receive splits swapped.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from hecate.comm.stats import CommStats


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank inside `group`, size of `group`); `group` None is the world."""
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where small control tensors must live for `group`'s backend (NCCL wants CUDA): the device
    the group is bound to (init_process_group(device_id=...), inherited by new groups), which
    NCCL then requires, else the current CUDA device."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        pg = dist.distributed_c10d._get_default_group() if group is None else group
        bound = getattr(pg, "bound_device_id", None)
        return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_splits(splits, world_size: int, arg: str) -> list[int]:
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.dtype.is_floating_point or splits.dtype == torch.bool:
            raise ValueError(f"{arg} must be a 1-D integer tensor or a list of ints, "
                             f"got {splits.dtype} tensor of shape {tuple(splits.shape)}")
        values = [int(v) for v in splits.tolist()]
    else:
        values = [int(v) for v in splits]
    if len(values) != world_size:
        raise ValueError(f"{arg} has {len(values)} entries; it needs one per rank of the group "
                         f"({world_size})")
    if any(v < 0 for v in values):
        raise ValueError(f"{arg} = {values} has a negative entry; row counts must be >= 0")
    return values


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, group=None, async_op: bool = False):
    """Concatenate every rank's equal-sized `x` into `out` (all_gather_single where torch has it).
    With `async_op`, returns the work handle to wait on (else None, complete)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def all_reduce_coalesced(tensors: Sequence[torch.Tensor], group=None, stats=None, name: str = "all_reduce",
                         ranks: Sequence[int] | None = None) -> None:
    """Sum `tensors` over the group in place with one all-reduce of their concatenation: one
    collective (one launch and latency on NCCL) instead of one per tensor, the same sums.
    `stats` records a ring all-reduce's bytes, 2 (k - 1) / k of the buffer each way per rank,
    under `name` over the group's global `ranks`. Nothing to sum: no collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else None
    if flat is None or not flat.numel():
        return
    dist.all_reduce(flat, group=group)
    if stats is not None:
        k, n = group_rank_and_size(group)[1], flat.numel() * flat.element_size()
        stats.record(name, 2 * (k - 1) * n // k, 2 * (k - 1) * n // k, ranks=ranks)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, group=None) -> None:
    """Sum every rank's `x` and keep this rank's equal slice in `out` (reduce_scatter_single
    where torch has it)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)


def reduce_scatter_by_all_to_all(own: torch.Tensor, others: torch.Tensor, group=None) -> None:
    """A reduce-scatter from one all_to_all_single, for gloo, whose reduce_scatter reduces the
    whole input and took longer than an all-reduce of it (docs/results.md).

    The flat input x is given as this rank's slice `own` and the other W - 1 slices `others`
    (x without `own`, in rank order). Each rank sends every peer that peer's slice and adds the
    W - 1 slices it receives to `own` in rank order, ((x_0 + x_1) + x_2) + ..., so `own` ends as
    the sum every rank would compute alike (for W = 2 the all-reduce's bits: a + b == b + a).
    Neither this rank's slice nor its copy crosses: the bytes of a ring reduce-scatter,
    (W - 1) * own.numel() elements each way per rank."""
    rank, world = group_rank_and_size(group)
    n = own.numel()
    if own.dim() != 1 or others.dim() != 1 or others.numel() != (world - 1) * n or others.dtype != own.dtype:
        raise ValueError(f"reduce_scatter_by_all_to_all needs 1-D own and others in one dtype, others holding "
                         f"the W - 1 = {world - 1} other slices of own's size; got own {own.dtype} "
                         f"{tuple(own.shape)}, others {others.dtype} {tuple(others.shape)}")
    if world == 1:
        return
    received = torch.empty_like(others)
    splits = [0 if r == rank else n for r in range(world)]
    dist.all_to_all_single(received, others.contiguous(), output_split_sizes=splits, input_split_sizes=splits,
                           group=group)
    rows = received.view(world - 1, n)  # x_0 .. x_{W-1} without x_rank, which is `own`
    if rank >= 2:
        partial = rows[0]  # x_0 + ... + x_{rank-1}, summed in the received buffer
        for i in range(1, rank):
            partial.add_(rows[i])
        own.add_(partial)  # x_rank + partial == partial + x_rank bit for bit (one addition)
        first = rank
    else:
        own.add_(rows[0])  # x_0 + x_1 (either way round: one addition)
        first = 1
    for i in range(first, world - 1):  # x_{i+1}
        own.add_(rows[i])


def exchange_splits(send_splits: list[int], group=None) -> list[int]:
    """Tell every rank how many rows it will receive from each peer (a small all_to_all)."""
    send = torch.tensor(send_splits, dtype=torch.int64, device=comm_device(group))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return [int(v) for v in recv.tolist()]




def group_ranks(group) -> list[int] | None:
    """Global ranks of `group`'s members in group order (None: the group is the world)."""
    if group is None or group is dist.group.WORLD:
        return None
    return list(dist.get_process_group_ranks(group))


def exchange_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
                  stats: CommStats | None = None, name: str = "all_to_all_v", peers=None) -> torch.Tensor:
    """The exchange under all_to_all_v, without its argument checks or autograd: for callers
    whose splits (lists) are known to cover x and to mirror the peers' (fssdp's expert node).
    Counted in `stats` under `name`; `peers` = (this rank in `group`, group_ranks(group)) when
    the caller keeps them, else they are looked up."""
    if stats is not None:
        rank, ranks = peers if peers is not None else (dist.get_rank(group), group_ranks(group))
        row_bytes = x.element_size() * math.prod(x.shape[1:])
        stats.record_peers(name, [n * row_bytes for n in send_splits], [n * row_bytes for n in recv_splits],
                           rank, ranks)
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return out


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, stats, name):
        ctx.splits = (send_splits, recv_splits)
        ctx.group, ctx.stats, ctx.name = group, stats, name
        return exchange_rows(x, send_splits, recv_splits, group, stats, name)

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_x = exchange_rows(grad_out, recv_splits, send_splits, ctx.group, ctx.stats, ctx.name + ".backward")
        return grad_x, None, None, None, None, None


def all_to_all_v(x: torch.Tensor, send_splits: Sequence[int] | torch.Tensor,
                 recv_splits: Sequence[int] | torch.Tensor | None = None, group=None,
                 stats: CommStats | None = None, name: str = "all_to_all_v") -> torch.Tensor:
    """Send rows `x[offset_r : offset_r + send_splits[r]]` to rank r of `group`; return what arrives.

    The result holds the rows received from rank 0, then rank 1, ... (`recv_splits[r]`
    rows from rank r). When `recv_splits` is None it is learned with a small
    all_to_all of the split sizes. Any split may be 0, a rank may send or receive
    nothing. Differentiable: the gradient flows back through the mirror exchange.
    Bytes crossing ranks are counted in `stats` under `name` (and `name + ".backward"`).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with a leading row dimension, got {type(x).__name__} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    rank, world_size = group_rank_and_size(group)
    send = _as_splits(send_splits, world_size, "send_splits")
    if sum(send) != x.shape[0]:
        raise ValueError(f"send_splits = {send} sums to {sum(send)} but x has {x.shape[0]} rows "
                         f"(x.shape = {tuple(x.shape)}); the splits must cover x exactly")
    if recv_splits is None:
        recv = exchange_splits(send, group)
    else:
        recv = _as_splits(recv_splits, world_size, "recv_splits")
    return _AllToAllV.apply(x, send, recv, group, stats, name)
