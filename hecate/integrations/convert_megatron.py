"""Megatron-core MoE weights <-> Hecate local names (no Megatron import).

Input: a plain Megatron state dict (model.state_dict(), or a torch-format checkpoint's
'model' entry read with torch.load(weights_only=True)); torch_dist/zarr distributed
checkpoints must first be converted to torch format with Megatron's own tools.

Per MoE layer N (Megatron prefix `decoder.layers.N.mlp`, Hecate prefix from
`hecate_prefix`, default the same path, where the Hecate Megatron spec puts its layer):
  router.weight [E, D]                                   -> router.weight_ED
  router.expert_bias [E]                                 -> router.expert_bias_E (zeros if absent)
  router.bias [E] (add_bias_linear)                      -> router.bias_E
  experts.local_experts.E.linear_fc1.weight [F|2F, D]    -> experts.w1_EFD[E] (+ w3_EFD[E], swiglu)
  experts.local_experts.E.linear_fc2.weight [D, F]       -> experts.w2_EDF[E]
  experts.linear_fc1.weightE / linear_fc2.weightE        (TEGroupedMLP: same, per expert)
  experts.weight1 [D, E*F|E*2F] / experts.weight2 [E*F, D] (legacy GroupedMLP)
  shared_experts.linear_fc1.weight / linear_fc2.weight   -> shared_experts.w1_FD (+ w3_FD) / w2_DF
  shared_experts.gate_weight [1, D]                      -> shared_gate.weight (moe_shared_expert_gate)
Gated (swiglu) fc1 rows are [gate; up]: Megatron applies silu to the first half, so
w1 = fc1[:F] and w3 = fc1[F:].
Experts with biases (add_bias_linear=True, Megatron's default; sequential or TE grouped
layout) become Hecate's biased experts (MoEConfig.expert_bias, hecate.moe.module_experts):
  linear_fc1.weight / .bias [F|2F, D] / [F|2F]  -> experts.fc1__weight[E] / experts.fc1__bias[E]
  linear_fc2.weight / .bias [D, F] / [D]        -> experts.fc2__weight[E] / experts.fc2__bias[E]
(fc1 rows unchanged: the biased expert splits [gate; up] itself). `_extra_state` entries (Transformer Engine metadata) are
dropped. Every other key is copied unchanged.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Optional

import torch

from hecate.integrations.convert_deepspeed import CheckpointFormatError

_ROUTER = re.compile(r"^(.*decoder\.layers\.(\d+)\.mlp)\.router\.weight$")
LAYOUTS = ("sequential", "te_grouped", "legacy_grouped")


def _split_glu(fc1: torch.Tensor, gated: bool):
    if not gated:
        return fc1, None
    if fc1.shape[0] % 2:
        raise CheckpointFormatError(f"gated fc1 has an odd row count {fc1.shape[0]}")
    f = fc1.shape[0] // 2
    return fc1[:f], fc1[f:]


def _expert_biases(state: dict, p: str, e: int, used: set):
    """Stacked (fc1 bias, fc2 bias) of one layer, or None when the experts are bias-free."""
    for b1, b2 in ((f"{p}.experts.local_experts.{{}}.linear_fc1.bias", f"{p}.experts.local_experts.{{}}.linear_fc2.bias"),
                   (f"{p}.experts.linear_fc1.bias{{}}", f"{p}.experts.linear_fc2.bias{{}}")):
        keys1, keys2 = [b1.format(i) for i in range(e)], [b2.format(i) for i in range(e)]
        if all(k in state for k in keys1 + keys2):
            used.update(keys1, keys2)
            return torch.stack([state[k].float() for k in keys1]), torch.stack([state[k].float() for k in keys2])
    return None


def _experts(state: dict, p: str, e: int, d: int, gated: bool, used: set):
    """Stacked (w1, w2, w3) of one layer from whichever expert layout the state dict uses."""
    seq = [f"{p}.experts.local_experts.{i}.linear_fc1.weight" for i in range(e)]
    te = [f"{p}.experts.linear_fc1.weight{i}" for i in range(e)]
    if all(k in state for k in seq):
        fc1 = [state[k] for k in seq]
        fc2 = [state[f"{p}.experts.local_experts.{i}.linear_fc2.weight"] for i in range(e)]
        used.update(seq, (f"{p}.experts.local_experts.{i}.linear_fc2.weight" for i in range(e)))
    elif all(k in state for k in te):
        fc1 = [state[k] for k in te]
        fc2 = [state[f"{p}.experts.linear_fc2.weight{i}"] for i in range(e)]
        used.update(te, (f"{p}.experts.linear_fc2.weight{i}" for i in range(e)))
    elif f"{p}.experts.weight1" in state:
        w1_DX = state[f"{p}.experts.weight1"]
        w2_XD = state[f"{p}.experts.weight2"]
        # GroupedMLP reinterprets the buffers: view(E, D, F') and view(E, F, D), x @ w per expert.
        fc1 = list(w1_DX.reshape(e, d, -1).transpose(1, 2))  # [E, F', D]
        fc2 = list(w2_XD.reshape(e, -1, d).transpose(1, 2))  # [E, D, F]
        used.update({f"{p}.experts.weight1", f"{p}.experts.weight2"})
    else:
        raise CheckpointFormatError(f"{p}: no expert weights for {e} experts (looked for local_experts.N, "
                                    "linear_fc1.weightN and weight1/weight2); is the checkpoint sharded by EP?")
    for k in [k for k in state if k.startswith(p + ".experts.") and "bias" in k.rsplit(".", 1)[-1]
              and k not in used]:
        raise CheckpointFormatError(f"{k}: expert biases must be present for every expert's fc1 and fc2")
    halves = [_split_glu(w.float(), gated) for w in fc1]
    w1 = torch.stack([h[0] for h in halves])
    w3 = torch.stack([h[1] for h in halves]) if gated else None
    w2 = torch.stack([w.float() for w in fc2])
    if w1.shape[2] != d or w2.shape[1:] != (d, w1.shape[1]):
        raise CheckpointFormatError(f"{p}: expert shapes w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} do not form "
                                    f"a D={d} -> F -> D MLP (wrong `gated`?)")
    return w1, w2, w3


def megatron_to_hecate(state: Dict[str, torch.Tensor], gated: bool = False,
                       hecate_prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Megatron names -> Hecate names. gated: swiglu experts (Megatron --swiglu).
    hecate_prefix: format string with {layer} for the Hecate layer path, e.g.
    'blocks.{layer}.ffn' for hecate.models.transformer.MoETransformer; None keeps the Megatron path."""
    out, used = OrderedDict(), set()
    layers = [(m.group(1), int(m.group(2))) for k in state for m in [_ROUTER.match(k)] if m]
    if not layers:
        raise CheckpointFormatError("no Megatron MoE router found (no key like "
                                    "'decoder.layers.N.mlp.router.weight')")
    for p, n in layers:
        h = p if hecate_prefix is None else hecate_prefix.format(layer=n)
        router = state[p + ".router.weight"]
        e, d = router.shape
        out[h + ".router.weight_ED"] = router.float()
        bias = state.get(p + ".router.expert_bias")
        out[h + ".router.expert_bias_E"] = torch.zeros(e) if bias is None else bias.float()
        used.update({p + ".router.weight", p + ".router.expert_bias"})
        if p + ".router.bias" in state:  # add_bias_linear: the router's logit bias
            out[h + ".router.bias_E"] = state[p + ".router.bias"].float()
            used.add(p + ".router.bias")
        biases = _expert_biases(state, p, e, used)
        w1, w2, w3 = _experts(state, p, e, d, gated, used)
        if biases is not None:  # biased experts keep Megatron's fused fc1 rows
            fc1 = w1 if w3 is None else torch.cat([w1, w3], dim=1)
            out[h + ".experts.fc1__weight"], out[h + ".experts.fc1__bias"] = fc1.contiguous(), biases[0]
            out[h + ".experts.fc2__weight"], out[h + ".experts.fc2__bias"] = w2.contiguous(), biases[1]
        else:
            out[h + ".experts.w1_EFD"], out[h + ".experts.w2_EDF"] = w1.contiguous(), w2.contiguous()
            if w3 is not None:
                out[h + ".experts.w3_EFD"] = w3.contiguous()
        s1 = state.get(p + ".shared_experts.linear_fc1.weight")
        if s1 is not None:
            gate = state.get(p + ".shared_experts.gate_weight")
            if gate is not None:  # moe_shared_expert_gate: sigmoid(x @ gate^T) * shared(x)
                out[h + ".shared_gate.weight"] = gate.float()
                used.add(p + ".shared_experts.gate_weight")
            a, b = _split_glu(s1.float(), gated)
            out[h + ".shared_experts.w1_FD"] = a
            if b is not None:
                out[h + ".shared_experts.w3_FD"] = b
            out[h + ".shared_experts.w2_DF"] = state[p + ".shared_experts.linear_fc2.weight"].float()
            used.update({p + ".shared_experts.linear_fc1.weight", p + ".shared_experts.linear_fc2.weight"})
    for k, v in state.items():
        if k in used or k.endswith("_extra_state"):
            continue
        if not torch.is_tensor(v):
            raise CheckpointFormatError(f"{k}: not a tensor ({type(v).__name__})")
        out[k] = v
    return out


def hecate_to_megatron(state: Dict[str, torch.Tensor], layout: str = "sequential",
                       hecate_prefix: Optional[str] = None,
                       expert_bias: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Hecate names -> Megatron names in `layout` ('sequential' = SequentialMLP local_experts,
    'te_grouped' = TEGroupedMLP linear_fc1.weightN, 'legacy_grouped' = GroupedMLP weight1/2).
    hecate_prefix must match the one used for megatron_to_hecate (None = Megatron paths).
    expert_bias: write router.expert_bias (Megatron registers it only with
    moe_router_enable_expert_bias); None = only when it is non-zero."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if hecate_prefix is None:
        pat = re.compile(r"^(.*decoder\.layers\.(\d+)\.mlp)\.router\.weight_ED$")
    else:
        pat = re.compile("^" + re.escape(hecate_prefix).replace(re.escape("{layer}"), r"(\d+)")
                         + r"\.router\.weight_ED$")
    out, used = OrderedDict(), set()
    found = False
    for k in list(state):
        m = pat.match(k)
        if not m:
            continue
        found = True
        h = k[: -len(".router.weight_ED")]
        n = int(m.groups()[-1])  # the layer number (last group in both patterns)
        p = h if hecate_prefix is None else f"decoder.layers.{n}.mlp"
        out[p + ".router.weight"] = state[k]
        if h + ".router.bias_E" in state:
            out[p + ".router.bias"] = state[h + ".router.bias_E"]
            used.add(h + ".router.bias_E")
        bias = state.get(h + ".router.expert_bias_E")
        if bias is not None and (expert_bias or (expert_bias is None and bool(bias.any()))):
            out[p + ".router.expert_bias"] = bias
        elif expert_bias and bias is None:
            out[p + ".router.expert_bias"] = torch.zeros(state[k].shape[0])
        b1 = b2 = None
        if h + ".experts.fc1__weight" in state:  # biased experts (MoEConfig.expert_bias)
            fc1, w2 = state[h + ".experts.fc1__weight"], state[h + ".experts.fc2__weight"]
            b1, b2 = state[h + ".experts.fc1__bias"], state[h + ".experts.fc2__bias"]
            used.update(h + f".experts.fc{j}__{t}" for j in (1, 2) for t in ("weight", "bias"))
            if layout == "legacy_grouped":
                raise CheckpointFormatError(f"{h}: Megatron's legacy GroupedMLP has no expert biases; "
                                            "use layout 'sequential' or 'te_grouped'")
            e, d = fc1.shape[0], w2.shape[1]
        else:
            w1, w2, w3 = (state.get(h + f".experts.{n_}") for n_ in ("w1_EFD", "w2_EDF", "w3_EFD"))
            e, f, d = w1.shape
            fc1 = w1 if w3 is None else torch.cat([w1, w3], dim=1)  # [E, F', D], rows [gate; up]
        for i in range(e):
            if layout == "sequential":
                out[f"{p}.experts.local_experts.{i}.linear_fc1.weight"] = fc1[i].clone()
                out[f"{p}.experts.local_experts.{i}.linear_fc2.weight"] = w2[i].clone()
                if b1 is not None:
                    out[f"{p}.experts.local_experts.{i}.linear_fc1.bias"] = b1[i].clone()
                    out[f"{p}.experts.local_experts.{i}.linear_fc2.bias"] = b2[i].clone()
            elif layout == "te_grouped":
                out[f"{p}.experts.linear_fc1.weight{i}"] = fc1[i].clone()
                out[f"{p}.experts.linear_fc2.weight{i}"] = w2[i].clone()
                if b1 is not None:
                    out[f"{p}.experts.linear_fc1.bias{i}"] = b1[i].clone()
                    out[f"{p}.experts.linear_fc2.bias{i}"] = b2[i].clone()
        if layout == "legacy_grouped":
            out[f"{p}.experts.weight1"] = fc1.transpose(1, 2).contiguous().reshape(d, -1)
            out[f"{p}.experts.weight2"] = w2.transpose(1, 2).contiguous().reshape(-1, d)
        used.update({k, h + ".router.expert_bias_E", h + ".experts.w1_EFD", h + ".experts.w2_EDF",
                     h + ".experts.w3_EFD"})
        if h + ".shared_experts.w1_FD" in state:
            s1, s3 = state[h + ".shared_experts.w1_FD"], state.get(h + ".shared_experts.w3_FD")
            out[p + ".shared_experts.linear_fc1.weight"] = s1 if s3 is None else torch.cat([s1, s3])
            out[p + ".shared_experts.linear_fc2.weight"] = state[h + ".shared_experts.w2_DF"]
            used.update({h + ".shared_experts.w1_FD", h + ".shared_experts.w3_FD", h + ".shared_experts.w2_DF"})
            if h + ".shared_gate.weight" in state:
                out[p + ".shared_experts.gate_weight"] = state[h + ".shared_gate.weight"]
                used.add(h + ".shared_gate.weight")
        extra = [x for x in state if x.startswith(h + ".") and x not in used]
        if extra:
            raise CheckpointFormatError(f"{extra}: no Megatron counterpart (residual MoE is DeepSpeed-only)")
    if not found:
        raise CheckpointFormatError("no Hecate MoE router found (no key ending in '.router.weight_ED' "
                                    f"under hecate_prefix={hecate_prefix!r})")
    for k, v in state.items():
        if k not in used:
            out[k] = v
    return out
