"""Data parallelism for the dense (non-expert) parameters.

Dense parameters are replicated and their gradients averaged over the world
with one flat all-reduce per step (a single bucket: few, large messages beat
many small ones on both gloo and NCCL). Expert parameters are excluded: their
strategy synchronizes them (see ExpertStrategy.finish_backward).

This is the replicated form (parallel.dense_optimizer=replicated, the baselines'
default); hecate/parallel/dense_shard.py shards the dense optimizer state (ZeRO-1,
FSSDP's default) with the same bytes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hecate.parallel.chunks import is_expert_parameter


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and not is_expert_parameter(p)]


def all_reduce_dense_gradients(model: nn.Module, group=None, stats=None) -> None:
    """Average the gradients of dense parameters over `group` (all ranks by default)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    params = dense_parameters(model)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    if stats is not None:
        w, n = dist.get_world_size(group), flat.numel() * flat.element_size()
        stats.record("dense.all_reduce", 2 * (w - 1) * n // w, 2 * (w - 1) * n // w)  # ring all-reduce
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_dense_parameters(model: nn.Module, src: int = 0, group=None) -> None:
    """Make every rank start from rank `src`'s dense weights."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    for p in dense_parameters(model):
        dist.broadcast(p.data, src=src, group=group)
