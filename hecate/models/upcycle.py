"""BAM upcycling: build an MoE transformer from N dense checkpoints of one shape.

The dense sources are state_dicts of MoETransformer models with attention "mha" and no
MoE layers (the same d_model, heads, FFN width and parallel_block as the target). Per
block of the target:
  * an MoE FFN takes source n's dense FFN as expert n (fc1 -> w1, fc2 -> w2, fc3 -> w3);
  * BAM attention takes source n's attention as branch n (own K/V), or with K/V shared:
    its query and output projections, the K/V projections averaged;
every other weight (embeddings, norms, dense FFNs, head) is the mean of the sources, and
routers keep their fresh initialization.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from hecate.models.transformer import MoETransformer, TransformerConfig


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def upcycle_bam(dense_states: Sequence[Mapping[str, torch.Tensor]], cfg: TransformerConfig) -> MoETransformer:
    """The MoETransformer of `cfg` initialized from the N dense state_dicts (see module doc).

    cfg must have attention "bam" with bam_attention_experts == N, or "mha" (attention
    averaged); every MoE layer must have N experts and ffn_hidden_size equal to the dense
    FFN width, without shared or residual experts.
    """
    n = len(dense_states)
    if n < 1:
        raise ValueError("dense_states must hold at least one dense state_dict")
    if cfg.attention not in ("bam", "mha"):
        raise ValueError(f"upcycle_bam: cfg.attention must be 'bam' or 'mha', got {cfg.attention!r}")
    if cfg.attention == "bam" and cfg.bam_attention_experts != n:
        raise ValueError(f"cfg.bam_attention_experts ({cfg.bam_attention_experts}) must equal the number "
                         f"of dense checkpoints ({n})")
    model = MoETransformer(cfg)
    target = model.state_dict()
    keys = set(dense_states[0])
    for j, sd in enumerate(dense_states[1:], 1):
        if set(sd) != keys:
            raise ValueError(f"dense_states[{j}] has different keys from dense_states[0]: "
                             f"{sorted(set(sd) ^ keys)[:5]}")
    out: dict = {}
    used: set = set()

    def src(key: str) -> list:
        if key not in keys:
            raise ValueError(f"dense checkpoints lack {key!r}; they must be MoETransformer state_dicts "
                             "with attention 'mha' and no MoE layers")
        used.add(key)
        return [sd[key] for sd in dense_states]

    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if cfg.is_moe_layer(i):
            mc = block.ffn.config
            if mc.num_experts != n:
                raise ValueError(f"layer {i}: MoE has {mc.num_experts} experts but there are {n} dense checkpoints")
            if mc.num_shared_experts or mc.use_residual:
                raise ValueError(f"layer {i}: upcycling into shared or residual experts is not supported")
            for dense_name, expert_name in (("fc1", "w1_EFD"), ("fc2", "w2_EDF"), ("fc3", "w3_EFD")):
                if p + f"ffn.experts.{expert_name}" not in target:
                    continue
                w = torch.stack(src(p + f"ffn.{dense_name}.weight"))
                want = tuple(target[p + f"ffn.experts.{expert_name}"].shape)
                if tuple(w.shape) != want:
                    raise ValueError(f"layer {i}: dense ffn.{dense_name}.weight stacks to {tuple(w.shape)} but "
                                     f"the experts need {want}; set moe.ffn_hidden_size to the dense FFN width")
                out[p + f"ffn.experts.{expert_name}"] = w
        if cfg.attention == "bam":
            qkv, o = src(p + "attn.qkv.weight"), src(p + "attn.out.weight")
            if cfg.bam_shared_kv:
                hq = block.attn.n_heads * block.attn.head_dim
                for e in range(n):
                    out[p + f"attn.branches.{e}.q.weight"] = qkv[e][:hq]
                    out[p + f"attn.branches.{e}.out.weight"] = o[e]
                out[p + "attn.kv.weight"] = _mean([w[hq:] for w in qkv])
            else:
                for e in range(n):
                    out[p + f"attn.branches.{e}.qkv.weight"] = qkv[e]
                    out[p + f"attn.branches.{e}.out.weight"] = o[e]
    for key in keys - used:  # everything else: the mean of the sources
        if key in target and key not in out:
            out[key] = _mean(src(key))
    for key, value in out.items():
        if key not in target or tuple(target[key].shape) != tuple(value.shape):
            raise ValueError(f"upcycle_bam: {key} has shape {tuple(value.shape)} in the dense checkpoints but "
                             f"{tuple(target[key].shape) if key in target else 'is absent'} in the target config")
    missing = [k for k in target if k not in out and "router" not in k]
    if missing:
        raise ValueError(f"upcycle_bam: no dense weights for {missing[:5]}; the checkpoints must have "
                         "the target's shape (d_model, heads, FFN width, parallel_block, embeddings)")
    model.load_state_dict(out, strict=False)
    return model
