"""SparseAllGather (spAG) and SparseReduceScatter (spRS) of expert chunks.

Placement vocabulary (DESIGN.md): owner_C says which rank owns each chunk (P0);
holders_WC[r, c] says whether rank r holds chunk c this iteration (P1, P0 a subset).

- spAG copies each chunk from its owner to every other holder. A rank passes the
  rows of the chunks it owns (ascending chunk id) and gets back the rows of every
  chunk it holds (ascending chunk id).
- spRS is its adjoint: every holder's gradient of a chunk is summed into the owner
  (the owner's own contribution first, then the other holders by ascending rank).

Each is the autograd backward of the other. The split planning (`plan_sparse`) runs
on the host (one C++ op, sparse_plan, when hecate._C is built; else numpy) and reads only
this rank's part of the placement (the holders of
the chunks it owns, its own row); packing runs in hecate.ops (C++ / CUDA kernels); the
transport is one `all_to_all_single` with
uneven splits on the group, issued from Python, synchronously or asynchronously
(`start_*`). This is the only transport: training (FSSDP's replica exchanges),
checkpoint gathers and re-sharding all use it (docs/comm.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import time

import numpy as np
import torch
import torch.distributed as dist

from hecate import ops
from hecate.comm.agreement import AgreementError, check_agreement
from hecate.comm.all_to_all import group_rank_and_size, group_ranks
from hecate.comm.stats import CommStats

__all__ = ["SparsePlan", "plan_sparse", "sparse_all_gather", "sparse_reduce_scatter",
           "start_spag", "start_sprs", "start_replica_gather", "start_replica_reduce"]


@dataclass(frozen=True)
class SparsePlan:
    """One rank's side of spAG(owner_C -> holders_WC); spRS uses it with directions swapped.

    Row maps turn chunk ids into row indices of the buffers the caller holds:
    `send_rows` index owned_OS, `recv_rows` / `owned_rows_M` index materialized_MS.
    """

    rank: int
    world_size: int
    num_chunks: int
    send_counts: list[int]       # chunks sent to each rank by spAG (received by spRS)
    recv_counts: list[int]       # chunks received from each rank by spAG (sent by spRS)
    send_ids: torch.Tensor       # chunk ids, destinations ascending then ids ascending
    recv_ids: torch.Tensor       # chunk ids, sources ascending then ids ascending
    owned_ids: torch.Tensor      # chunks this rank owns, ascending (rows of owned_OS)
    held_ids: torch.Tensor       # chunks this rank holds, ascending (rows of materialized_MS)
    send_rows: torch.Tensor      # owned_OS row of each send_ids entry
    recv_rows: torch.Tensor      # materialized_MS row of each recv_ids entry
    owned_rows_M: torch.Tensor   # materialized_MS row of each owned chunk


def _validate_placement(owner_C, holders_WC, world_size: int) -> None:
    if not isinstance(holders_WC, torch.Tensor) or holders_WC.dim() != 2 or holders_WC.dtype != torch.bool:
        raise ValueError(f"holders_WC must be a bool tensor of shape [W, C], got "
                         f"{getattr(holders_WC, 'dtype', type(holders_WC).__name__)} of shape "
                         f"{tuple(getattr(holders_WC, 'shape', ()))}")
    if holders_WC.shape[0] != world_size:
        raise ValueError(f"holders_WC has {holders_WC.shape[0]} rows but the group has {world_size} "
                         f"ranks; holders_WC must be [W={world_size}, C]")
    C = holders_WC.shape[1]
    if (not isinstance(owner_C, torch.Tensor) or owner_C.dim() != 1 or owner_C.dtype.is_floating_point
            or owner_C.dtype == torch.bool):
        raise ValueError(f"owner_C must be a 1-D integer tensor of shape [C={C}], got "
                         f"{getattr(owner_C, 'dtype', type(owner_C).__name__)} of shape "
                         f"{tuple(getattr(owner_C, 'shape', ()))}")
    if owner_C.shape[0] != C:
        raise ValueError(f"owner_C has {owner_C.shape[0]} entries but holders_WC has C={C} chunk "
                         "columns; give one owner per chunk")


def plan_sparse(owner_C: torch.Tensor, holders_WC: torch.Tensor, rank: int) -> SparsePlan:
    """Plan this rank's spAG / spRS exchange (pure function of the placement, same on every rank).

    Reads only what concerns `rank`: the holders of the chunks it owns (its sends) and its
    own row (its receives), O(C + W * owned chunks), never the whole [W, C] placement.
    Gives exactly the plan of hecate.ops.plan_sparse_collective (tests/test_comm_sparse.py).
    """
    if not isinstance(holders_WC, torch.Tensor) or holders_WC.dim() != 2:
        raise ValueError(f"holders_WC must be a bool tensor of shape [W, C], got "
                         f"{type(holders_WC).__name__} of shape {tuple(getattr(holders_WC, 'shape', ()))}")
    _validate_placement(owner_C, holders_WC, holders_WC.shape[0])
    W, C = holders_WC.shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < W:
        raise ValueError(f"rank must be an int in [0, {W}), got {rank!r}")
    device = owner_C.device
    if (owner_C.dtype == torch.int64 and owner_C.device.type == "cpu" and holders_WC.device.type == "cpu"
            and ops._backend.use_extension("sparse_plan", device)):  # one C++ call (csrc/cpu/plan.cpp)
        (send_ids, send_counts, recv_ids, recv_counts, owned_ids, held_ids, send_rows, recv_rows,
         owned_rows_M) = torch.ops.hecate.sparse_plan(owner_C.detach(), holders_WC.detach(), int(rank))
        return SparsePlan(rank=int(rank), world_size=W, num_chunks=C, send_counts=send_counts.tolist(),
                          recv_counts=recv_counts.tolist(), send_ids=send_ids, recv_ids=recv_ids,
                          owned_ids=owned_ids, held_ids=held_ids, send_rows=send_rows, recv_rows=recv_rows,
                          owned_rows_M=owned_rows_M)
    owner = owner_C.detach().cpu().numpy().astype(np.int64, copy=False)
    holders = holders_WC.detach().cpu().numpy()
    if C and (owner.min() < 0 or owner.max() >= W):
        c = int(np.flatnonzero((owner < 0) | (owner >= W))[0])
        raise ValueError(f"owner_C[{c}] = {int(owner[c])} is out of range [0, {W}): every chunk "
                         "needs one owner")
    owner_holds = holders[owner, np.arange(C)]
    if not owner_holds.all():
        c = int(np.flatnonzero(~owner_holds)[0])
        raise ValueError(f"owner {int(owner[c])} of chunk {c} is not among its holders (holders_WC["
                         f"{int(owner[c])}, {c}] is False): P0 must be a subset of P1")
    owned_mask = owner == rank
    held_mask = holders[rank]
    owned_ids = np.flatnonzero(owned_mask)
    # Sends: every other holder of each owned chunk; nonzero of [W, owned] walks destinations
    # ascending, then chunks ascending.
    others = holders[:, owned_ids]  # a copy: [W, owned chunks]
    others[rank] = False
    dst, j = np.nonzero(others)
    send_ids = owned_ids[j]
    # Receives: held chunks owned by others, by source (owner) ascending, then chunk id.
    recv_ids = np.flatnonzero(held_mask & ~owned_mask)
    recv_ids = recv_ids[np.argsort(owner[recv_ids], kind="stable")]
    # Row of each chunk inside owned_OS / materialized_MS (cumulative count of owned / held chunks).
    owned_row_C = np.cumsum(owned_mask) - 1
    held_row_C = np.cumsum(held_mask) - 1

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    return SparsePlan(
        rank=int(rank), world_size=W, num_chunks=C,
        send_counts=np.bincount(dst, minlength=W).tolist(),
        recv_counts=np.bincount(owner[recv_ids], minlength=W).tolist(),
        send_ids=tensor(send_ids), recv_ids=tensor(recv_ids), owned_ids=tensor(owned_ids),
        held_ids=tensor(np.flatnonzero(held_mask)),
        send_rows=tensor(owned_row_C[send_ids]), recv_rows=tensor(held_row_C[recv_ids]),
        owned_rows_M=tensor(held_row_C[owned_ids]),
    )


def _record(stats: CommStats | None, name: str, owner_C, holders_WC, rank: int, group, row_bytes: int,
            reduce: bool = False) -> None:
    """Count an spAG (spRS when `reduce`) per peer: a gather sends each owned chunk to its
    other holders and receives each held chunk from its owner; a reduce is the mirror."""
    if stats is None:
        return
    holders_WC, owner_C = holders_WC.cpu(), owner_C.cpu().to(torch.int64)
    W = holders_WC.shape[0]
    to_P = holders_WC[:, owner_C == rank].sum(1)
    from_P = torch.bincount(owner_C[holders_WC[rank]], minlength=W)
    if reduce:
        to_P, from_P = from_P, to_P
    stats.record_peers(name, (to_P * row_bytes).tolist(), (from_P * row_bytes).tolist(), rank,
                       group_ranks(group))


# --- the transport, without autograd -------------------------------------------------------

class PendingExchange:
    """An spAG or spRS whose all-to-all may still be in flight; `wait()` completes it.

    The send buffer is kept referenced until the exchange has finished with it.
    """

    def __init__(self, work, send_nS, finish):
        self._work, self._send, self._finish = work, send_nS, finish

    def then(self, fn) -> "PendingExchange":
        """Apply `fn` to the result when it is complete (wait() returns fn(result))."""
        finish = self._finish
        self._finish = lambda: fn(finish())
        return self

    def wait(self) -> tuple[torch.Tensor, float]:
        """Complete the exchange; return (result, seconds the host spent blocked).

        gloo: blocks the host until the rows arrived. NCCL: makes the current CUDA stream wait
        for the collective and returns at once (the result is ready for work queued on that
        stream; a host read such as .cpu() synchronizes), so the seconds are ~0 there: time
        the wait on the device (hecate.parallel.fssdp.clock)."""
        start = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        blocked = time.perf_counter() - start
        result = self._finish()
        self._work = self._send = self._finish = None
        return result, blocked


def start_spag(owned_OS, plan: SparsePlan, group, async_op: bool = False) -> PendingExchange:
    """Start an spAG; `wait()` returns every held chunk, [M, S] ascending id:
    the replica exchange below, with the owned rows and the arrivals unpacked into one buffer."""
    device = owned_OS.device
    out_MS = owned_OS.new_empty((plan.held_ids.numel(), owned_OS.shape[1]))
    ops.unpack_chunks(owned_OS, plan.owned_rows_M.to(device), out_MS)

    def place(recv_RS):
        ops.unpack_chunks(recv_RS, plan.recv_rows.to(device), out_MS)
        return out_MS

    return start_replica_gather(owned_OS, plan, group, async_op).then(place)


def start_sprs(grads_MS, plan: SparsePlan, group, async_op: bool = False) -> PendingExchange:
    """Start an spRS from the gradients of every held chunk ([M, S], ascending id): the owned
    rows are the owner's own contribution, the others travel to their owners."""
    device = grads_MS.device
    replicas_RS = ops.pack_chunks(grads_MS, plan.recv_rows.to(device))  # plan.recv_ids order
    out_OS = ops.pack_chunks(grads_MS, plan.owned_rows_M.to(device))  # own contribution first
    return start_replica_reduce(replicas_RS, out_OS, plan, group, async_op)


def start_replica_gather(owned_OS, plan: SparsePlan, group, async_op: bool = False,
                         wire_dtype: torch.dtype | None = None,
                         out: torch.Tensor | None = None) -> PendingExchange:
    """spAG without the owner's own rows: `wait()` returns only the chunks received from
    other owners, [R, S] in `plan.recv_ids` order (sources ascending, then chunk id).

    A caller that computes with its owned rows in place (FSSDP's experts) needs no copy
    of them: this skips the unpack of owned and received rows into one [M, S] buffer,
    which on a rank owning many chunks copies far more bytes than the exchange moves.
    `wire_dtype` (e.g. bf16 when the receivers only compute with a bf16 cast of the rows):
    rows are cast before they travel and arrive in that dtype.
    `out`: receive into this [R, S] buffer (e.g. storage re-grown for the replicas) instead
    of a new one.
    """
    send_nS = ops.pack_chunks(owned_OS, plan.send_rows.to(owned_OS.device))
    if wire_dtype is not None and wire_dtype != send_nS.dtype:
        send_nS = send_nS.to(wire_dtype)
    shape = (sum(plan.recv_counts), owned_OS.shape[1])
    if out is not None and (tuple(out.shape) != shape or out.dtype != send_nS.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {send_nS.dtype} tensor of shape {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    recv_RS = send_nS.new_empty(shape) if out is None else out
    work = dist.all_to_all_single(recv_RS, send_nS, output_split_sizes=plan.recv_counts,
                                  input_split_sizes=plan.send_counts, group=group, async_op=async_op)
    return PendingExchange(work, send_nS, lambda: recv_RS)


def start_replica_reduce(grads_RS, owned_grads_OS, plan: SparsePlan, group,
                         async_op: bool = False) -> PendingExchange:
    """The adjoint of start_replica_gather: send the gradient of every replica this rank
    holds (`grads_RS`, rows in `plan.recv_ids` order) to its owner; `wait()` adds the
    received rows into `owned_grads_OS` in place (ascending source rank) and returns it.
    The rows travel in grads_RS's dtype (bf16 gradients of bf16 replicas stay bf16 on the
    wire, exactly) and are widened to owned_grads_OS's dtype on arrival.
    """
    device = owned_grads_OS.device
    recv_nS = grads_RS.new_empty((sum(plan.send_counts), owned_grads_OS.shape[1]))
    work = dist.all_to_all_single(recv_nS, grads_RS.contiguous(), output_split_sizes=plan.send_counts,
                                  input_split_sizes=plan.recv_counts, group=group, async_op=async_op)

    def finish():
        ops.scatter_add_chunks(recv_nS.to(owned_grads_OS.dtype), plan.send_rows.to(device), owned_grads_OS)
        return owned_grads_OS

    return PendingExchange(work, grads_RS, finish)


def _spag(owned_OS, owner_C, holders_WC, rank, group, stats, name):
    row_bytes = owned_OS.shape[1] * owned_OS.element_size()
    plan = plan_sparse(owner_C, holders_WC, rank)
    _record(stats, name, owner_C, holders_WC, rank, group, row_bytes)
    return start_spag(owned_OS, plan, group).wait()[0], plan.held_ids


def _sprs(grads_MS, owner_C, holders_WC, rank, group, stats, name):
    row_bytes = grads_MS.shape[1] * grads_MS.element_size()
    plan = plan_sparse(owner_C, holders_WC, rank)
    _record(stats, name, owner_C, holders_WC, rank, group, row_bytes, reduce=True)
    return start_sprs(grads_MS, plan, group).wait()[0]


class _SparseAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned_OS, owner_C, holders_WC, rank, group, stats, name):
        ctx.saved = (owner_C, holders_WC, rank, group, stats, name)
        out_MS, held_ids = _spag(owned_OS, owner_C, holders_WC, rank, group, stats, name)
        ctx.mark_non_differentiable(held_ids)
        return out_MS, held_ids

    @staticmethod
    def backward(ctx, grad_MS, _grad_ids):
        owner_C, holders_WC, rank, group, stats, name = ctx.saved
        grad_OS = _sprs(grad_MS.contiguous(), owner_C, holders_WC, rank, group, stats,
                        name + ".backward")
        return grad_OS, None, None, None, None, None, None


class _SparseReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grads_MS, owner_C, holders_WC, rank, group, stats, name):
        ctx.saved = (owner_C, holders_WC, rank, group, stats, name)
        return _sprs(grads_MS, owner_C, holders_WC, rank, group, stats, name)

    @staticmethod
    def backward(ctx, grad_OS):
        owner_C, holders_WC, rank, group, stats, name = ctx.saved
        grad_MS, _ = _spag(grad_OS.contiguous(), owner_C, holders_WC, rank, group, stats,
                           name + ".backward")
        return grad_MS, None, None, None, None, None, None


def _validate_owners(owner_C, holders_WC) -> None:
    W, C = holders_WC.shape
    if C and (int(owner_C.min()) < 0 or int(owner_C.max()) >= W):
        c = int(((owner_C < 0) | (owner_C >= W)).nonzero()[0])
        raise ValueError(f"owner_C[{c}] = {int(owner_C[c])} is out of range [0, {W}); "
                         "every chunk needs one owner rank of the group")
    owner_holds = holders_WC[owner_C.clamp(0, max(W - 1, 0)), torch.arange(C, device=owner_C.device)]
    if not bool(owner_holds.all()):
        c = int((~owner_holds).nonzero()[0])
        raise ValueError(f"the owner {int(owner_C[c])} of chunk {c} does not hold it "
                         f"(holders_WC[{int(owner_C[c])}, {c}] is False): P0 must be a subset of P1")


def _prepare(buf, buf_name, rows_expected, rows_what, owner_C, holders_WC, group, check, name):
    """Validate arguments (ValueError naming the problem) and, when `check`, agree on the placement.

    A rank whose own arguments are bad still takes part in the agreement (with a marker
    value), so its peers fail at once with an AgreementError naming it instead of
    waiting in the exchange until the collective timeout.
    """
    rank, world_size = group_rank_and_size(group)
    problem = None
    try:
        _validate_placement(owner_C, holders_WC, world_size)
        if not isinstance(buf, torch.Tensor) or buf.dim() != 2:
            raise ValueError(f"{buf_name} must be a 2-D tensor [rows, S] (one flat chunk per row), got "
                             f"{type(buf).__name__} of shape {tuple(getattr(buf, 'shape', ()))}")
        owner_C = owner_C.to(device=buf.device, dtype=torch.int64).contiguous()
        holders_WC = holders_WC.to(buf.device).contiguous()
        _validate_owners(owner_C, holders_WC)
        n_rows = int(rows_expected(owner_C, holders_WC, rank))
        if buf.shape[0] != n_rows:
            raise ValueError(f"{buf_name} has {buf.shape[0]} rows but rank {rank} {rows_what} {n_rows} "
                             f"chunks; pass one row per such chunk in ascending chunk id")
    except ValueError as exc:
        problem = exc
    if check:
        # Everyone must agree on the placement, the chunk size and the dtype, or the
        # exchange would hang or mix up buffers: fail loudly on every rank instead.
        value = ("invalid arguments" if problem is not None
                 else [owner_C, holders_WC, int(buf.shape[1]), str(buf.dtype)])
        try:
            check_agreement(name, value, group)
        except AgreementError:
            if problem is not None:
                raise problem from None
            raise
    if problem is not None:
        raise problem
    return rank, owner_C, holders_WC, buf.contiguous()


def sparse_all_gather(owned_OS: torch.Tensor, owner_C: torch.Tensor, holders_WC: torch.Tensor,
                      group=None, stats: CommStats | None = None, *, check: bool = True,
                      name: str = "spAG"):
    """spAG: materialize every chunk this rank holds. Returns (materialized_MS, materialized_ids_M).

    owned_OS: the rows of the chunks this rank owns (`owner_C == rank`), ascending chunk id.
    owner_C: [C] owner rank (in `group`) of each chunk. holders_WC: [W, C] bool, rank r holds
    chunk c this iteration; every owner must hold its chunks. Every rank of `group` calls this
    with the same owner_C / holders_WC, chunk size S and dtype (checked with one tiny
    all-gather when `check`). Differentiable: the backward is spRS. Bytes are counted in
    `stats` under `name`.
    """
    rank, owner_C, holders_WC, owned_OS = _prepare(
        owned_OS, "owned_OS", lambda o, h, r: (o == r).sum(), "owns", owner_C, holders_WC,
        group, check, name)
    return _SparseAllGather.apply(owned_OS, owner_C, holders_WC, rank, group, stats, name)


def sparse_reduce_scatter(grads_MS: torch.Tensor, owner_C: torch.Tensor, holders_WC: torch.Tensor,
                          group=None, stats: CommStats | None = None, *, check: bool = True,
                          name: str = "spRS") -> torch.Tensor:
    """spRS: sum every holder's gradient of a chunk into its owner. Returns owned_grads_OS.

    grads_MS: this rank's gradient of every chunk it holds (`holders_WC[rank]`), ascending
    chunk id (the layout sparse_all_gather returns). The result has one row per owned chunk,
    ascending: the owner's own gradient plus the other holders' in ascending rank order.
    Differentiable: the backward is spAG. Same arguments and checks as sparse_all_gather.
    """
    rank, owner_C, holders_WC, grads_MS = _prepare(
        grads_MS, "grads_MS", lambda o, h, r: h[r].sum(), "holds", owner_C, holders_WC,
        group, check, name)
    return _SparseReduceScatter.apply(grads_MS, owner_C, holders_WC, rank, group, stats, name)
