"""Data parallelism for the dense parameters with a sharded optimizer (ZeRO stage 1).

Every rank keeps the full dense weights (attention, embeddings, norms, routers: every
forward needs them) but AdamW state for only 1/W of them:

* the dense parameters become views of one flat buffer, padded to W equal shards;
  rank r's shard is a Parameter over flat[r*n:(r+1)*n] (a view, no copy), and it is
  the only dense tensor the optimizer sees;
* after backward the flat gradient is reduce-scattered (sum, then / W: the same
  average as the replicated all-reduce), so each rank holds its shard's gradient.
  On NCCL that is its reduce_scatter. On gloo it is one all_to_all_single: every rank
  sends each peer that peer's slice of its flat gradient and adds the W - 1 slices it
  receives to its own in rank order (comm's reduce_scatter_by_all_to_all; its own slice
  is copied apart and never crosses, so no full flat copy is received). gloo's own
  reduce_scatter reduces the whole input (it took ~2x an all-reduce of the same
  512 KiB on 2 ranks), and an all-reduce keeping the slice moves twice the bytes; the
  all-to-all moves (W-1)/W of the buffer, and on 2 gloo ranks the all-to-all, the sum
  and the all-gather below take about one all-reduce's time (the whole sync, with
  its buffers, still more than the replicated one: docs/results.md). For W = 2 the sum is the
  all-reduce's bit for bit (a + b); for W > 2 the rank order may differ from gloo's
  ring order in the last bits. Each shard is summed by its owner only and then
  all-gathered, so every rank still ends with the same weights;
* after the optimizer step the shards are all-gathered back into the flat buffer,
  so every rank's dense weights are current again. With `async_op` the gather is only
  issued and `wait_parameters()` completes it; nothing may read or write the dense
  parameters in between (the Engine steps the expert rows meanwhile and waits before its
  step returns: docs/fssdp.md, `overlap_dense_gather`).

Bytes are those of the replicated all-reduce (a ring all-reduce is a reduce-scatter
plus an all-gather), and the dense optimizer state shrinks from 2x to 2x/W of the
dense parameters. AdamW is elementwise, so stepping flat shards equals stepping the
parameters one by one (tests/test_dense_shard.py checks it against a single process).

Why not FSDP2 for the dense part: it would also shard the dense weights, paying an
all-gather before every layer; MoE models keep most parameters in experts, which
FSSDP already shards, so the dense weights are cheap to keep whole.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import torch.distributed as dist

from hecate.comm.all_to_all import all_gather_flat, reduce_scatter_by_all_to_all, reduce_scatter_flat


class DenseShard:
    """The flat dense buffer of one rank and its optimizer shard (see module docstring)."""

    def __init__(self, params: list[nn.Parameter], rank: int, world_size: int, group=None):
        if not params:
            raise ValueError("DenseShard needs at least one dense parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"parallel.dense_optimizer=sharded needs every dense parameter in one dtype on "
                             f"one device, got dtypes {sorted(map(str, dtypes))} on {sorted(map(str, devices))}; "
                             "cast the model first or use parallel.dense_optimizer=replicated")
        if dist.is_initialized() and (rank, world_size) != (dist.get_rank(group), dist.get_world_size(group)):
            # The collectives place shards by the group's ranks; another numbering would step one
            # rank's shard with another's gradient.
            raise ValueError(f"DenseShard got rank {rank} of {world_size}, but this process is rank "
                             f"{dist.get_rank(group)} of {dist.get_world_size(group)} in the dense group; "
                             "pass the group's own rank and size")
        self.params, self.rank, self.world_size, self.group = params, rank, world_size, group
        # gloo: reduce-scatter by one all-to-all and a local sum (module docstring); any other
        # backend (NCCL) uses its reduce_scatter.
        self.reduce_by_all_to_all = dist.is_initialized() and str(dist.get_backend(group)) == "gloo"
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = math.ceil(self.numel / world_size)
        p0 = params[0]
        self.flat = torch.zeros(self.shard_numel * world_size, dtype=p0.dtype, device=p0.device)
        starts = [0]
        for p in params:
            starts.append(starts[-1] + p.numel())
        self.slices = [(p, slice(a, b)) for p, a, b in zip(params, starts, starts[1:])]  # p's range in flat
        with torch.no_grad():
            for p, where in self.slices:
                self.flat[where].copy_(p.detach().reshape(-1))
                p.data = self.flat[where].view_as(p)
        lo = rank * self.shard_numel
        # A Parameter over the rank's slice of the flat buffer: the optimizer updates it in place.
        self.shard = nn.Parameter(self.flat[lo:lo + self.shard_numel], requires_grad=True)
        self._gather = None  # (work, its input) of an all-gather issued with async_op, not waited on

    @property
    def shard_range(self) -> tuple[int, int]:
        lo = self.rank * self.shard_numel
        return lo, lo + self.shard_numel

    def reduce_scatter_gradients(self, stats=None) -> None:
        """Sum every rank's dense gradients into the owners of their shards, divide by W."""
        lo, hi = self.shard_range
        total = self.flat.numel()
        if self.reduce_by_all_to_all:
            # This rank's slice apart from the others (each one cat, no full flat copy): it is
            # neither sent nor received, and the sum lands in it.
            out = torch.cat(self._gradient_pieces(lo, hi))
            others = (torch.cat(self._gradient_pieces(0, lo) + self._gradient_pieces(hi, total))
                      if self.world_size > 1 else self.flat.new_empty(0))
            self._drop_parameter_gradients()
            reduce_scatter_by_all_to_all(out, others, group=self.group)
            del others
        else:
            grad_flat = torch.cat(self._gradient_pieces(0, total))
            self._drop_parameter_gradients()
            out = torch.empty(self.shard_numel, dtype=self.flat.dtype, device=self.flat.device)
            reduce_scatter_flat(out, grad_flat, group=self.group)
        out /= self.world_size
        self.shard.grad = out
        self._record(stats, "dense.reduce_scatter")

    def _gradient_pieces(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Elements [lo, hi) of the flat gradient, in order: views of the parameters' gradients
        (zeros for a parameter without one, as in the all-reduce) and zeros for the padding."""
        pieces = []
        for p, where in self.slices:
            a, b = max(lo, where.start), min(hi, where.stop)
            if a < b:
                pieces.append(p.grad.reshape(-1)[a - where.start:b - where.start] if p.grad is not None
                              else self.flat.new_zeros(b - a))
        if hi > self.numel:
            pieces.append(self.flat.new_zeros(hi - max(lo, self.numel)))
        return pieces

    def _drop_parameter_gradients(self) -> None:
        for p in self.params:
            p.grad = None  # the shard's gradient is all this rank keeps

    def all_gather_parameters(self, stats=None, async_op: bool = False) -> None:
        """Every rank's updated shard into every rank's flat buffer (and so its dense params).
        async_op: issue it and return; wait_parameters() completes it (the flat buffer, the
        parameters and the shard must not be read or written before)."""
        self.wait_parameters()  # never two in flight on one buffer
        mine = self.shard.detach().clone()  # input and output of the gather must not alias
        work = all_gather_flat(self.flat, mine, group=self.group, async_op=async_op)
        if async_op:
            self._gather = (work, mine)  # `mine` stays alive until the gather has read it
        self._record(stats, "dense.all_gather")

    @property
    def gather_pending(self) -> bool:
        return self._gather is not None

    def wait_parameters(self) -> None:
        """Complete an all-gather issued with async_op (nothing to do otherwise). On NCCL this
        makes the current stream wait for it (the host does not block). The handle is dropped
        first, so a gather that failed raises here once and is never waited on again."""
        pending, self._gather = self._gather, None
        if pending is not None:
            pending[0].wait()

    def _record(self, stats, name: str) -> None:
        # A ring reduce-scatter's (all-gather's) bytes: what NCCL moves, and what gloo's
        # all-to-all reduce-scatter sends (W - 1 slices of the shard's size per rank).
        if stats is not None:
            crossing = (self.world_size - 1) * self.shard_numel * self.flat.element_size()
            stats.record(name, crossing, crossing)

    # ---- optimizer state in per-parameter form (checkpoints) --------------------------------
    def full_state(self, shard_state: dict) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Collective: the shard's optimizer state gathered into per-parameter tensors."""
        out = {p: {} for p in self.params}
        for k in sorted(shard_state):  # same order on every rank
            v = shard_state[k]
            if torch.is_tensor(v) and v.shape == self.shard.shape:
                flat = torch.empty_like(self.flat, dtype=v.dtype)
                all_gather_flat(flat, v.detach().contiguous(), group=self.group)
                for p, where in self.slices:
                    out[p][k] = flat[where].view_as(p).clone()
            else:
                for p in self.params:
                    out[p][k] = v.clone() if torch.is_tensor(v) else v
        return out

    def shard_state(self, states: dict[nn.Parameter, dict[str, torch.Tensor]]) -> dict:
        """Per-parameter optimizer state (every parameter present) -> this rank's shard state."""
        missing = [i for i, p in enumerate(self.params) if p not in states]
        if missing:
            raise ValueError(f"dense optimizer state is missing for {len(missing)} of {len(self.params)} dense "
                             "parameters; a checkpoint holds all or none of them")
        keys = set(states[self.params[0]])
        out = {}
        lo, hi = self.shard_range
        for k in sorted(keys, key=lambda k: (k != "step", k)):
            first = states[self.params[0]][k]
            if torch.is_tensor(first) and first.shape == self.params[0].shape:
                flat = torch.zeros_like(self.flat, dtype=first.dtype)
                for p, where in self.slices:
                    flat[where].copy_(states[p][k].reshape(-1))
                out[k] = flat[lo:hi].clone()
            else:
                out[k] = first.clone() if torch.is_tensor(first) else first
        return out
