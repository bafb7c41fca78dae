"""Activation checkpointing per transformer block (`model.activation_checkpointing`).

A checkpointed block keeps only its input and the tensors at the MoE boundary during the
forward, and recomputes the rest in backward (torch.utils.checkpoint, non-reentrant).

The MoE strategy's part (dispatch, experts, combine: `strategy.forward`) is deliberately
left OUTSIDE the recomputed regions. Under ep, fsdp and fssdp it holds every collective of
the layer (the fssdp count all-gather and planning, spAG, the token all-to-alls): a
recompute that re-ran it would plan again (a plan that may differ, as the load predictor
moved on) and issue collectives from inside the autograd engine, at a point that may
differ between ranks (a deadlock). Left outside, it runs exactly once per step in the
forward and once in backward, as without checkpointing: the same plan, routes and (with
re-materialization) the same re-gather, and no extra collective. tests/
test_activation_checkpointing.py counts them.

Per block with an MoE feed-forward, two recomputed regions around the strategy:

    [norm1 -> attention -> residual -> norm2 -> router -> capacity]   recomputed
    strategy.forward(layer, x_TD, routing)                            kept (collectives)
    [residual mix / shared experts (combine_dense)]                   recomputed

A dense block is recomputed whole (no collective: the dense weights are replicated).
What stays alive per MoE block: the block input, the residual stream after attention,
the router's input and outputs (routing), and what the strategy's expert computation
saves itself. `layer.recompute_experts` is set during strategy.forward: fssdp then keeps
only the received tokens and recomputes its expert MLP inside its own backward, from the
replicas it holds there anyway (re-gathered under RM): no extra collective. dp, ep and
fsdp recompute their local expert MLP (hecate.parallel.expert_compute.recomputed), with
their exchanges outside it: the dispatched tokens stay, the hidden layer does not.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from hecate.moe.layer import MoELayer


def checkpointing_active(module: torch.nn.Module) -> bool:
    """Recompute only when a backward will follow (training with grad enabled)."""
    return module.training and torch.is_grad_enabled()


def checkpointed_block(block, x: torch.Tensor, aux: list, stats: list, rope=None) -> torch.Tensor:
    """block(x, aux, stats, rope) with its local compute recomputed in backward.

    The aux losses and stats are collected in fresh lists inside the regions and appended
    to the caller's once: a recompute must not append them a second time.
    """
    if not isinstance(block.ffn, MoELayer):
        def whole(x_in):
            a, s = [], []
            y = block(x_in, a, s, rope)
            return y, a, s

        y, a, s = checkpoint(whole, x, use_reentrant=False)
        aux.extend(a)
        stats.extend(s)
        return y

    layer = block.ffn
    if type(layer).forward is not MoELayer.forward:  # its own forward would be bypassed here
        raise TypeError(f"model.activation_checkpointing: {type(layer).__name__} overrides MoELayer.forward; "
                        "checkpointing runs the stages prepare / strategy.forward / combine_dense / finish "
                        "itself. Override those stages instead, or turn activation_checkpointing off")

    def before(x_in):
        a = []
        if block.parallel:
            h = block.norm1(x_in)
            base, ffn_in = x_in + block._attend(h, rope, a), h
        else:
            base = x_in + block._attend(block.norm1(x_in), rope, a)
            ffn_in = block.norm2(base)
        x_TD, routing = layer.prepare(ffn_in)
        return base, x_TD, routing, a

    base, x_TD, routing, a = checkpoint(before, x, use_reentrant=False)
    aux.extend(a)
    layer.recompute_experts = True  # fssdp: the expert MLP is recomputed too (module docstring)
    try:
        moe_TD = layer.strategy.forward(layer, x_TD, routing)  # once: see the module docstring
    finally:
        layer.recompute_experts = False
    if layer.residual is None and layer.shared_experts is None:
        y_TD = layer.combine_dense(x_TD, moe_TD)  # nothing to recompute: moe_TD as is
    else:
        y_TD = checkpoint(layer.combine_dense, x_TD, moe_TD, use_reentrant=False)
    out = layer.finish(base, y_TD, routing)
    aux.append(out.aux_loss)
    stats.append(out.stats)
    return base + out.y
