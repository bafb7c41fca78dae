"""One training step under any strategy: backward, gradient sync, global clipping, AdamW.

The same engine drives the trainer, the benchmarks and the equivalence tests, so
what the tests prove is what users run.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from hecate.comm.all_to_all import comm_device
from hecate.parallel import moe_layers
from hecate.parallel.dense import all_reduce_dense_gradients, dense_parameters


class Engine:
    def __init__(self, model: nn.Module, strategy, topology=None, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                 max_grad_norm: float | None = None, optimizer_impl: str = "fused",
                 dense_optimizer: str = "auto", skip_nonfinite: bool = False):
        self.model, self.strategy, self.topology = model, strategy, topology
        self.async_dense_gather = False  # set below under a sharded dense optimizer (_step_dense_first)
        # With skip_nonfinite, a step whose global gradient norm (or the caller's loss) is NaN/inf
        # leaves parameters and optimizer state untouched: `last_step_skipped` says so.
        self.skip_nonfinite = skip_nonfinite
        self.last_step_skipped = False
        self.layers = moe_layers(model)
        self.max_grad_norm = max_grad_norm
        if dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"parallel.dense_optimizer={dense_optimizer!r} must be one of {DENSE_OPTIMIZERS}")
        if dense_optimizer == "auto":  # FSSDP shards everything with state; the baselines stay as they are
            dense_optimizer = "sharded" if getattr(strategy, "name", None) == "fssdp" else "replicated"
        self.dense_shard = None
        params = [p for p in model.parameters() if p.requires_grad]
        if dense_optimizer == "sharded" and self.distributed:
            from hecate.parallel.dense_shard import DenseShard

            dense = self._dense_parameters()
            if dense:
                self.dense_shard = DenseShard(dense, self.topology.rank, self.topology.world_size)
                dense_ids = {id(p) for p in dense}
                params = [p for p in params if id(p) not in dense_ids] + [self.dense_shard.shard]
                # fssdp's overlap_dense_gather (None elsewhere): on a device backend by default.
                overlap = getattr(strategy, "overlap_dense_gather", None)
                self.async_dense_gather = (comm_device(self.dense_shard.group).type != "cpu"
                                           if overlap is None else bool(overlap))
        # Every rank steps only what it keeps: expert rows it owns, and the dense parameters
        # (replicated) or its 1/W shard of them (sharded).
        self.optimizer = build_adamw(params, optimizer_impl, lr=lr, weight_decay=weight_decay,
                                     betas=betas, eps=eps)

    @property
    def distributed(self) -> bool:
        return dist.is_initialized() and self.topology is not None and self.topology.world_size > 1

    def sync_gradients(self) -> None:
        if self.dense_shard is not None:
            self.dense_shard.reduce_scatter_gradients(stats=self.topology.stats)
        elif self.distributed:
            all_reduce_dense_gradients(self.model, stats=self.topology.stats)
        self.strategy.finish_backward(self.layers)

    def _dense_parameters(self) -> list:
        # By identity: `local` does not mark its experts as expert parameters.
        expert_ids = {id(p) for layer in self.layers for p in self.strategy.expert_parameters(layer)}
        return [p for p in dense_parameters(self.model) if id(p) not in expert_ids]

    def grad_norm(self) -> float:
        """Global L2 norm over dense and expert gradients, every shard of every rank counted once."""
        expert_params = [p for layer in self.layers for p in self.strategy.expert_parameters(layer)]
        dense = [p.grad for p in self._dense_parameters() if p.grad is not None]
        experts = [p.grad for p in expert_params if p.grad is not None and p.grad.numel()]
        # One fused norm per list (no fp64 copies of the gradients); squares summed in fp64, on
        # the device until the one read of the total (each read stalls the host on a GPU).
        shard_grad = self.dense_shard.shard.grad if self.dense_shard is not None else None
        shard = [shard_grad] if shard_grad is not None else []
        first = next(iter(dense + experts + shard), None)
        device = comm_device(None) if self.distributed else first.device if first is not None else "cpu"
        dense_sq = _sum_of_squares(dense, device)
        sharded_sq = _sum_of_squares(experts, device) / self.strategy.expert_replication()
        if shard:
            sharded_sq += _sum_of_squares(shard, device)  # each element on one rank
        if self.distributed:
            dist.all_reduce(sharded_sq)
        return math.sqrt(float(dense_sq + sharded_sq))

    def clip(self, norm: float | None = None) -> float:
        norm = self.grad_norm() if norm is None else norm
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            scale = self.max_grad_norm / (norm + 1e-6)
            for group in self.optimizer.param_groups:  # what will be stepped: owned rows, shards
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return norm

    def _step_dense_first(self) -> None:
        """The optimizer step with the ZeRO-1 all-gather overlapped (overlap_dense_gather): AdamW
        steps the dense shard alone, the gather of the shards is issued, AdamW steps every other
        parameter (the expert rows) while it travels, and the gather is waited for before this
        returns, even if that step raises (so nothing reads the dense parameters early, and no
        handle outlives the step). AdamW skips parameters without a gradient and updates each
        parameter from its own gradient and state, so the two calls give the one call's values.
        On NCCL the wait makes the stream wait (the host does not block): the expert step's
        kernels, queued before it, run while the gather does."""
        shard = self.dense_shard.shard
        others = [p for group in self.optimizer.param_groups for p in group["params"]
                  if p is not shard and p.grad is not None]
        held = [p.grad for p in others]
        for p in others:
            p.grad = None
        try:
            self.optimizer.step()  # the dense shard only
        finally:
            for p, g in zip(others, held):
                p.grad = g
        self.dense_shard.all_gather_parameters(stats=self.topology.stats, async_op=True)
        shard_grad, shard.grad = shard.grad, None
        try:
            if others:
                self.optimizer.step()  # the rest, while the gather travels
        finally:
            shard.grad = shard_grad
            self.dense_shard.wait_parameters()

    def dense_optimizer_state(self) -> dict:
        """{dense parameter: its AdamW state} in per-parameter form (collective when sharded)."""
        if self.dense_shard is None:
            return {p: self.optimizer.state[p] for p in self._dense_parameters() if p in self.optimizer.state}
        state = self.optimizer.state.get(self.dense_shard.shard, {})
        if not state:
            return {}
        return self.dense_shard.full_state(state)

    def load_dense_optimizer_state(self, states: dict) -> None:
        """Set the dense parameters' AdamW state from per-parameter form (every rank passes all)."""
        if self.dense_shard is None:
            for p, st in states.items():
                self.optimizer.state[p] = st
        elif states:
            self.optimizer.state[self.dense_shard.shard] = self.dense_shard.shard_state(states)

    def step(self, loss_finite: bool = True) -> float:
        """Sync gradients, clip, step the optimizer, zero grads, let the strategy re-shard.

        With skip_nonfinite, a non-finite global gradient norm or `loss_finite=False` (the caller's
        loss, agreed over ranks) skips the optimizer step on every rank alike: the norm is
        all-reduced, so a NaN on any rank is a NaN on all (`norm > max` alone is False for NaN).
        """
        self.sync_gradients()
        norm = self.grad_norm()
        self.last_step_skipped = self.skip_nonfinite and not (loss_finite and math.isfinite(norm))
        if not self.last_step_skipped:
            self.clip(norm)
            if self.dense_shard is not None and self.async_dense_gather:
                self._step_dense_first()
            else:
                self.optimizer.step()
                if self.dense_shard is not None:
                    self.dense_shard.all_gather_parameters(stats=self.topology.stats)
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.strategy, "step_end"):
            self.strategy.step_end(self.layers, self.optimizer)
        return norm


OPTIMIZER_IMPLS = ("fused", "foreach", "single")
DENSE_OPTIMIZERS = ("auto", "sharded", "replicated")


def build_adamw(params, impl: str = "fused", **kwargs) -> torch.optim.AdamW:
    """AdamW with one of torch's implementations (config key optim.impl).

    "fused" (default) updates each tensor in one pass (benchmarks/optimizer.py compares the
    three); it falls back to "single" where torch has no fused kernel for a parameter's
    device or dtype. Every implementation is elementwise, so a
    sharded run still matches a single process: an element sees the same arithmetic
    whichever rank or tensor holds it (the tests check this within fp32 tolerance).
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optim.impl={impl!r} must be one of {OPTIMIZER_IMPLS}")
    params = list(params)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[impl]
    try:
        return torch.optim.AdamW(params, **kwargs, **flags)
    except RuntimeError:  # torch refuses fused for this device or dtype when it is constructed
        if impl != "fused":
            raise
        return torch.optim.AdamW(params, **kwargs, foreach=False)


def _sum_of_squares(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of the squared elements of `tensors`, a float64 scalar on `device` (not read back)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.double() for n in norms]).pow(2).sum().to(device)
