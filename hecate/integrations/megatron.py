"""Megatron-core MoE arguments / TransformerConfig fields -> Hecate config (no Megatron import).

`translate_megatron_args(args)` takes a dict, an argparse.Namespace or a Megatron
TransformerConfig and returns `(sections, notes)`: `sections["moe"]` holds MoEConfig
fields, `sections["parallel"]` the strategy, `sections["model"]` the layer pattern.
Every value Hecate cannot honour is collected into ONE ValueError. See docs/megatron.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from hecate.moe.config import MoEConfig

# Accepted at any value: performance / kernel / logging choices with no effect on the math.
PERF_KEYS = ("moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_token_dispatcher_type",
             "moe_permute_fusion", "moe_router_fusion", "moe_per_layer_logging", "moe_layer_recompute",
             "moe_shared_expert_overlap", "moe_router_dtype", "moe_enable_deepep", "moe_flex_dispatcher_backend",
             "moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_pad_expert_input_to_capacity")
# Supported only at these (Megatron default) values.
DEFAULT_ONLY = {
    "moe_input_jitter_eps": (None, "Hecate jitters the router input only in its top-1 'switch' router, "
                                   "whose weight is the probability, not Megatron's 1.0"),
    "moe_router_topk_limited_devices": (None, "use moe_router_num_groups / moe_router_group_topk"),
    "moe_router_force_load_balancing": (False, "a benchmarking mode that overrides the router"),
    "moe_router_padding_for_fp8": (False, "fp8 padding is not supported"),
    "moe_router_padding_for_quantization": (False, "quantization padding is not supported"),
    "moe_apply_probs_on_input": (False, "Hecate weights expert outputs, not inputs"),
    "moe_latent_size": (None, "latent MoE projections are not supported"),
    "moe_enable_routing_replay": (False, "routing replay is not supported"),
    "moe_use_upcycling": (False, "upcycling is a checkpoint step: convert the dense model first"),
    "moe_extended_tp": (False, "Hecate does not tensor-parallelize experts"),
    "moe_token_dropping": (False, "a legacy switch; use moe_expert_capacity_factor"),
    "expert_tensor_parallel_size": (None, "Hecate shards whole experts, never one expert's matrices"),
    "tensor_model_parallel_size": (1, "Hecate has no tensor parallelism for the dense layers"),
    "pipeline_model_parallel_size": (1, "Hecate has no pipeline parallelism"),
    "moe_router_bias": (False, "Hecate's gate is bias-free"),
}


def _as_dict(args) -> dict:
    if isinstance(args, dict):
        return dict(args)
    if dataclasses.is_dataclass(args):
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    raise TypeError(f"args must be a dict, an argparse.Namespace or a TransformerConfig, got {type(args).__name__}")


def _is_default(value, default) -> bool:
    """None / False / 0 all mean 'off'; a parallel size or scaling factor of 1 means 'none'."""
    if value == default or (value in (None, False, 0) and default in (None, False, 0)):
        return True
    return default in (None, 1) and value == 1


def _activation(a: dict, problems: list) -> str:
    """gelu, or swiglu for Megatron's gated SiLU (--swiglu)."""
    if a.get("swiglu"):
        return "swiglu"
    fn = a.get("activation_func")
    name = getattr(fn, "__name__", fn) if fn is not None else "gelu"
    gated = bool(a.get("gated_linear_unit", False))
    if name in ("silu", "swish") and gated:
        return "swiglu"
    if name == "gelu" and not gated:
        return "gelu"
    problems.append(f"activation_func={name} with gated_linear_unit={gated}: Hecate's experts run "
                    "gelu (ungated) or swiglu (gated silu)")
    return "gelu"


def _layer_pattern(freq, num_layers: Optional[int], problems: list) -> dict:
    """Megatron's moe_layer_freq as Hecate's (moe_every, first_dense_layers)."""
    if freq is None or freq == 1:
        return {"moe_every": 1, "first_dense_layers": 0}
    if isinstance(freq, str):
        problems.append(f"moe_layer_freq={freq!r}: pass the evaluated list of 0/1 per layer, not a string")
        return {}
    if isinstance(freq, int):
        if num_layers is None:
            problems.append("moe_layer_freq: an int frequency needs num_layers to build the pattern")
            return {}
        pattern = [1 if i % freq == 0 else 0 for i in range(num_layers)]
    else:
        pattern = [int(v) for v in freq]
        if num_layers is not None and len(pattern) != num_layers:
            problems.append(f"moe_layer_freq has {len(pattern)} entries but num_layers={num_layers}")
            return {}
    n = len(pattern)
    for every in range(1, n + 1):
        for first in range(n + 1):
            if all(bool(p) == (i >= first and (i + 1) % every == 0) for i, p in enumerate(pattern)):
                return {"moe_every": every, "first_dense_layers": first}
    problems.append(f"moe_layer_freq={freq!r} (layers {pattern}): Hecate places MoE layers at "
                    "i >= first_dense_layers with (i + 1) % moe_every == 0; this pattern has no such form")
    return {}


def _balancing(a: dict, moe: dict, problems: list) -> None:
    kinds = a.get("moe_router_load_balancing_type", "aux_loss")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    coeffs = a.get("moe_aux_loss_coeff", 0.0)
    coeffs = list(coeffs) if isinstance(coeffs, (list, tuple)) else [coeffs] * len(kinds)
    if len(coeffs) != len(kinds):
        problems.append(f"moe_aux_loss_coeff={coeffs} must give one value per load-balancing type {kinds}")
        return
    for kind, coeff in zip(kinds, coeffs):
        if kind == "aux_loss":
            moe["aux_loss_coeff"] = float(coeff or 0.0)
        elif kind == "seq_aux_loss":
            moe["seq_aux_loss_coeff"] = float(coeff or 0.0)
        elif kind == "none":
            pass
        else:
            problems.append(f"moe_router_load_balancing_type={kind!r}: supported are aux_loss, seq_aux_loss "
                            "and none (sinkhorn and global_aux_loss are not implemented in Hecate)")


def translate_megatron_args(args, strategy: Optional[str] = None) -> Tuple[dict, list]:
    """(sections, notes) for Megatron MoE settings; ValueError listing every unsupported value.

    strategy: Hecate strategy for the `parallel` section; default 'ep' with Megatron's
    expert_model_parallel_size when that is > 1, else 'fssdp'.
    """
    a = _as_dict(args)
    problems, notes = [], []
    e = a.get("num_moe_experts")
    if not e:
        raise ValueError("num_moe_experts is not set: this Megatron config has no MoE layers")
    hidden = a.get("hidden_size")
    ffn = a.get("moe_ffn_hidden_size") or a.get("ffn_hidden_size")
    if not hidden or not ffn:
        problems.append("hidden_size and moe_ffn_hidden_size (or ffn_hidden_size) are required")
    k = a.get("moe_router_topk", 2)
    moe = {"hidden_size": hidden, "ffn_hidden_size": ffn, "num_experts": e, "top_k": k,
           "min_capacity": 0, "activation": _activation(a, problems)}
    score = a.get("moe_router_score_function", "softmax")
    if score not in ("softmax", "sigmoid"):
        problems.append(f"moe_router_score_function={score!r}: supported are softmax and sigmoid")
    moe["score_func"] = score
    # Megatron: softmax over the top-k logits (= renormalized probabilities) unless pre_softmax;
    # sigmoid scores are divided by their sum when k > 1.
    moe["renormalize"] = not a.get("moe_router_pre_softmax", False) if score == "softmax" else k > 1
    groups, group_topk = a.get("moe_router_num_groups"), a.get("moe_router_group_topk")
    if groups or group_topk:
        if not (groups and group_topk):
            problems.append("moe_router_num_groups and moe_router_group_topk must be set together")
        else:
            per = k // group_topk
            moe.update(router="group_limited", num_groups=groups, topk_groups=group_topk)
            if per in (1, 2):
                moe["group_score"] = "max" if per == 1 else "top2_sum"
            else:
                problems.append(f"moe_router_topk={k} / moe_router_group_topk={group_topk}: Megatron scores a "
                                f"group by its top-{per} sum; Hecate supports the top-1 (max) or top-2 sum")
    moe["aux_free_bias"] = bool(a.get("moe_router_enable_expert_bias", False))
    if a.get("moe_router_bias_update_rate") is not None:
        moe["bias_update_rate"] = float(a["moe_router_bias_update_rate"])
    _balancing(a, moe, problems)
    moe["z_loss_coeff"] = float(a.get("moe_z_loss_coeff") or 0.0)
    cf = a.get("moe_expert_capacity_factor")
    moe["capacity_factor"] = None if cf is None else float(cf)
    moe["eval_capacity_factor"] = moe["capacity_factor"]
    policy = a.get("moe_token_drop_policy", "probs")
    if policy not in ("probs", "position"):
        problems.append(f"moe_token_drop_policy={policy!r}: supported are probs and position")
    moe["drop_policy"] = "probability" if policy == "probs" else "position"
    shared = a.get("moe_shared_expert_intermediate_size")
    if shared:
        moe.update(num_shared_experts=1, shared_expert_hidden_size=int(shared))
        # Megatron's gate: shared output * sigmoid(x @ gate_weight^T), gate_weight [1, D]
        moe["shared_expert_gate"] = bool(a.get("moe_shared_expert_gate", False))
    elif a.get("moe_shared_expert_gate"):
        problems.append("moe_shared_expert_gate=True without moe_shared_expert_intermediate_size")
    scaling = a.get("moe_router_topk_scaling_factor")
    if scaling not in (None, 0):
        moe["routed_scaling_factor"] = float(scaling)  # Megatron multiplies the top-k probs by it
    # Megatron's default add_bias_linear=True gives every expert Linear a bias; Hecate's biased
    # experts compute sum_k p_k (W2 act(W1 x + b1) + b2), which is what Megatron computes.
    if a.get("add_bias_linear", True):
        if shared:
            problems.append("add_bias_linear=True with shared experts: Hecate's shared experts are bias-free "
                            "(pass --disable-bias-linear, or drop moe_shared_expert_intermediate_size)")
        else:
            moe["expert_bias"] = moe["router_bias"] = True
    for key, (default, why) in DEFAULT_ONLY.items():
        if key in a and not _is_default(a[key], default):
            problems.append(f"{key}={a[key]!r}: {why}")
    if a.get("sequence_parallel") and a.get("tensor_model_parallel_size", 1) == 1:
        notes.append("sequence_parallel: no effect without tensor parallelism")
    for key in PERF_KEYS:
        if a.get(key) not in (None, False):
            notes.append(f"{key}={a[key]!r}: a kernel/dispatch choice; Hecate's strategy decides, same math")
    known = set(PERF_KEYS) | set(DEFAULT_ONLY) | {
        "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_score_function",
        "moe_router_pre_softmax", "moe_router_num_groups", "moe_router_group_topk",
        "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_load_balancing_type",
        "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_capacity_factor", "moe_token_drop_policy",
        "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_shared_expert_gate",
        "moe_router_topk_scaling_factor"}
    for key in sorted(k_ for k_ in a if k_.startswith("moe_") and k_ not in known):
        if a[key] not in (None, False, 0, [], ""):
            problems.append(f"{key}={a[key]!r}: not translated by Hecate")
    model = _layer_pattern(a.get("moe_layer_freq", 1), a.get("num_layers"), problems)
    if hidden:
        model["d_model"] = hidden
    for src, dst in (("num_layers", "n_layers"), ("num_attention_heads", "n_heads")):
        if a.get(src):
            model[dst] = a[src]
    ep = a.get("expert_model_parallel_size") or 1
    name = strategy or ("ep" if ep > 1 else "fssdp")
    parallel = {"strategy": name}
    if name == "ep":
        parallel["ep_size"] = ep
    elif ep > 1:
        notes.append(f"expert_model_parallel_size={ep}: strategy {name!r} places experts itself")
    if not problems:
        try:
            MoEConfig(**moe).validate()
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("Megatron MoE settings cannot be translated to Hecate; fix these:\n  - "
                         + "\n  - ".join(problems))
    return {"moe": moe, "model": model, "parallel": parallel}, notes


def megatron_moe_config(args) -> MoEConfig:
    """The validated MoEConfig of one Megatron MoE layer."""
    sections, _ = translate_megatron_args(args)
    return MoEConfig(**sections["moe"]).validate()
