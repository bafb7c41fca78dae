"""Expert pruning: drop experts from MoE layers (router rows included) and write a smaller run.

Removing an expert's router row renormalises the softmax over the remaining experts, so a
pruned layer computes exactly what the full layer computes with those experts disabled
(hecate.moe.overrides); tests/test_inference_overrides.py checks it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from hecate.moe.layer import MoELayer

# Parameters / buffers of these submodules have one row per expert on dim 0.
_PER_EXPERT = ("router.", "experts.")


def prune_layer(layer: MoELayer, keep: Sequence[int]) -> MoELayer:
    """A new MoELayer (local strategy) holding only the experts `keep` (in that order) of `layer`."""
    E = layer.config.num_experts
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= e < E for e in keep):
        raise ValueError(f"keep={keep} must list distinct expert ids in [0, num_experts={E})")
    if layer.config.top_k > len(keep):
        raise ValueError(f"keeping {len(keep)} experts leaves fewer than top_k={layer.config.top_k}; keep more")
    cfg = layer.config.replace(num_experts=len(keep))
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"keeping {len(keep)} of {E} experts: {e}") from None
    new = MoELayer(cfg).to(next(layer.parameters()).device)
    idx = torch.tensor(keep, dtype=torch.int64)
    state = {}
    for name, t in layer.state_dict().items():
        if name.startswith(_PER_EXPERT) and t.dim() >= 1 and t.shape[0] == E:
            t = t.index_select(0, idx.to(t.device))
        state[name] = t
    new.load_state_dict(state, strict=True)
    return new.train(layer.training)


def prune_model(model, keep_per_layer: Sequence[Sequence[int]]):
    """Replace every MoE layer of an MoETransformer by prune_layer(layer, keep) in place; the
    model config's per-layer expert counts follow. Returns the model."""
    blocks = [b for b in model.blocks if isinstance(b.ffn, MoELayer)]
    if len(keep_per_layer) != len(blocks):
        raise ValueError(f"keep_per_layer has {len(keep_per_layer)} entries; the model has {len(blocks)} MoE layers")
    for block, keep in zip(blocks, keep_per_layer):
        block.ffn = prune_layer(block.ffn, keep)
    model.cfg.moe_experts_per_layer = [len(k) for k in keep_per_layer]
    model.cfg.validate()
    return model
