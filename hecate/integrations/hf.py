"""Hugging Face `transformers` checkpoints in and out of Hecate (docs/hf.md).

    model = from_hf("path/to/Mixtral")       # or a transformers model object
    model(input_ids).logits                   # a MoETransformer, same logits as transformers
    to_hf(model, "out_dir")                  # AutoModelForCausalLM.from_pretrained("out_dir") loads it

Architectures (transformers `model_type`): llama (dense), mixtral, qwen2_moe, qwen3_moe,
olmoe, deepseek_v3. The HF config becomes a TransformerConfig (`hecate_config`); weights
are renamed, joined or cut by the rules of `hf_keys` and never changed. Every HF option
Hecate cannot compute exactly (RoPE scaling, sliding windows, MLP biases, q/k/v clipping,
router jitter, other activations) raises ValueError naming the option instead of being
dropped. `to_hf` infers the architecture from the config (or takes `model_type=`) and
refuses a model whose config the target architecture cannot express.

transformers (the `hf` extra) is imported only by the functions that read or write HF
objects; `hecate_config` and the key mapping work without it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from hecate.integrations.hf_keys import model_rules
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig

SCALINGS = ("linear", "llama3", "yarn")
MODEL_TYPES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
              "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
              "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
              "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
              "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}

# TransformerConfig / MoEConfig fields that change training only, never the forward function:
# to_hf does not compare them (the HF config cannot hold them).
TRAINING_ONLY = {"aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff", "expert_balance_coeff",
                 "device_balance_coeff", "num_devices", "bias_update_rate", "max_seq_len", "moe_every",
                 "first_dense_layers", "moh_balance_coeff", "eval_capacity_factor", "min_capacity",
                 "drop_policy", "jitter_eps"}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the hf extra is in the test environment
        raise ImportError("hecate.integrations.hf needs `transformers`: pip install 'hecate[hf]'") from e
    return transformers


def _get(hf, *names, default=None):
    for n in names:
        v = getattr(hf, n, None)
        if v is not None:
            return v
    return default


def _refuse(model_type: str, option: str, value, why: str) -> None:
    raise ValueError(f"{model_type} config {option}={value!r} is not supported: {why}")


def _check_common(hf, mt: str) -> None:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", *SCALINGS):
        _refuse(mt, "rope_parameters.rope_type", rope.get("rope_type"),
                f"Hecate's RoPE scales frequencies as {SCALINGS} (dynamic / longrope change with the length)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(mt, "rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"],
                "Hecate rotates the whole head")
    if _get(hf, "hidden_act") != "silu":
        _refuse(mt, "hidden_act", _get(hf, "hidden_act"), "Hecate's gated MLPs are SwiGLU (silu) only")
    if getattr(hf, "mlp_bias", False):
        _refuse(mt, "mlp_bias", True, "Hecate's MLPs and experts are bias-free")
    window = getattr(hf, "sliding_window", None)
    uses_window = bool(window) and (mt != "qwen2_moe" or getattr(hf, "use_sliding_window", False))
    if uses_window and window < hf.max_position_embeddings:
        _refuse(mt, "sliding_window", window, "Hecate's attention is full causal attention")
    if getattr(hf, "clip_qkv", None) is not None:
        _refuse(mt, "clip_qkv", hf.clip_qkv, "Hecate does not clamp q/k/v")
    if getattr(hf, "router_jitter_noise", 0.0):
        _refuse(mt, "router_jitter_noise", hf.router_jitter_noise,
                "Mixtral's jitter scales the experts' input too; set it to 0")
    if getattr(hf, "pretraining_tp", 1) not in (None, 1):
        _refuse(mt, "pretraining_tp", hf.pretraining_tp, "set it to 1 (it only splits matmuls)")


def _rope_scaling(rope: dict) -> Optional[dict]:
    """HF rope_parameters -> TransformerConfig.rope_scaling (None for plain RoPE)."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    keep = {"type": kind}
    keep.update({k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")
                 and v is not None})
    return keep


def hecate_config(hf) -> TransformerConfig:
    """The TransformerConfig that computes what the HF config `hf` computes (ValueError naming
    the option when an HF option has no exact Hecate equivalent)."""
    mt = getattr(hf, "model_type", None)
    if mt not in MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported; Hecate converts {MODEL_TYPES}")
    _check_common(hf, mt)
    d, L, H = hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    head_dim = _get(hf, "head_dim") or d // H
    attn_bias = bool(getattr(hf, "attention_bias", False))
    base = dict(vocab_size=hf.vocab_size, d_model=d, n_layers=L, n_heads=H,
                n_kv_heads=_get(hf, "num_key_value_heads", default=H), head_dim=head_dim,
                max_seq_len=hf.max_position_embeddings, dense_ffn_hidden=hf.intermediate_size,
                tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), dense_activation="swiglu",
                rope=True, rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=float(hf.rms_norm_eps),
                rope_scaling=_rope_scaling(rope),
                qkv_bias=attn_bias, out_bias=attn_bias)
    moe = dict(hidden_size=d, activation="swiglu", aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0)))
    if mt == "llama":
        return TransformerConfig(**base, moe_layers=[],
                                 moe=MoEConfig(hidden_size=d, ffn_hidden_size=hf.intermediate_size,
                                               num_experts=1, top_k=1, activation="swiglu"))
    moe.update(num_experts=int(_get(hf, "num_local_experts", "num_experts", "n_routed_experts")),
               top_k=int(hf.num_experts_per_tok), renormalize=bool(getattr(hf, "norm_topk_prob", True)))
    if mt == "mixtral":
        moe.update(ffn_hidden_size=hf.intermediate_size, renormalize=True)
        layers = list(range(L))
    elif mt == "olmoe":
        moe.update(ffn_hidden_size=hf.intermediate_size)
        base.update(qk_norm="full")
        layers = list(range(L))
    elif mt in ("qwen2_moe", "qwen3_moe"):
        moe.update(ffn_hidden_size=hf.moe_intermediate_size)
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
        layers = [i for i in range(L) if i not in dense and (i + 1) % step == 0]
        if mt == "qwen2_moe":
            base.update(qkv_bias=bool(getattr(hf, "qkv_bias", True)), out_bias=False)
            if hf.shared_expert_intermediate_size:
                moe.update(num_shared_experts=1, shared_expert_hidden_size=hf.shared_expert_intermediate_size,
                           shared_expert_gate=True)
        else:
            base.update(qk_norm="head")
    else:  # deepseek_v3
        rope_dim = hf.qk_rope_head_dim
        base.update(attention="mla", head_dim=rope_dim, n_kv_heads=None, qkv_bias=False, out_bias=attn_bias,
                    mla_q_lora_rank=hf.q_lora_rank, mla_kv_lora_rank=hf.kv_lora_rank,
                    mla_qk_nope_head_dim=hf.qk_nope_head_dim, mla_qk_rope_head_dim=rope_dim,
                    mla_v_head_dim=hf.v_head_dim, mla_rope_interleave=bool(getattr(hf, "rope_interleave", True)))
        groups = int(getattr(hf, "n_group", None) or 1)
        moe.update(ffn_hidden_size=hf.moe_intermediate_size, router="group_limited", score_func="sigmoid",
                   group_score="top2_sum", num_groups=groups, topk_groups=int(getattr(hf, "topk_group", None) or 1),
                   aux_free_bias=True, routed_scaling_factor=float(hf.routed_scaling_factor))
        if hf.n_shared_experts:
            moe.update(num_shared_experts=int(hf.n_shared_experts),
                       shared_expert_hidden_size=hf.moe_intermediate_size)
        layers = list(range(int(hf.first_k_dense_replace or 0), L))
    cfg = TransformerConfig(**base, moe_layers=layers, moe=MoEConfig(**moe))
    cfg.validate()
    return cfg


def infer_model_type(cfg: TransformerConfig) -> str:
    """The HF architecture a TransformerConfig is most naturally written as (see to_hf)."""
    if cfg.attention == "mla":
        return "deepseek_v3"
    if not any(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        return "llama"
    if cfg.moe.shared_expert_gate:
        return "qwen2_moe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.qk_norm == "full":
        return "olmoe"
    return "mixtral"


def _hf_rope(cfg: TransformerConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
    return {"rope_type": cfg.rope_scaling["type"], "rope_theta": cfg.rope_theta, **out}


def hf_config(cfg: TransformerConfig, model_type: Optional[str] = None):
    """The transformers config of `cfg` as `model_type` (default: infer_model_type). ValueError
    when that architecture cannot express cfg exactly, naming the fields that differ."""
    T = _transformers()
    mt = model_type or infer_model_type(cfg)
    if mt not in MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported; choose one of {MODEL_TYPES}")
    moe_idx = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    m = cfg.moe if moe_idx else None
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
              intermediate_size=cfg.dense_ffn_hidden, tie_word_embeddings=cfg.tie_embeddings,
              rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              rope_parameters=_hf_rope(cfg))
    if mt != "deepseek_v3":
        kw.update(num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads)
    if m is not None and cfg.moe_experts_per_layer is not None:
        raise ValueError("model.moe_experts_per_layer (a pyramid) has no Hugging Face equivalent")
    if mt == "llama":
        kw.update(attention_bias=cfg.out_bias)
    elif mt == "mixtral":
        kw.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=m.ffn_hidden_size,
                  router_aux_loss_coef=m.aux_loss_coeff)
    elif mt in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.ffn_hidden_size,
                  norm_topk_prob=m.renormalize, router_aux_loss_coef=m.aux_loss_coeff, decoder_sparse_step=1,
                  mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_idx])
        if mt == "qwen2_moe":
            kw.update(qkv_bias=cfg.qkv_bias,
                      shared_expert_intermediate_size=(m.shared_expert_hidden_size or m.ffn_hidden_size)
                      * m.num_shared_experts)
        else:
            kw.update(attention_bias=cfg.out_bias)
    elif mt == "olmoe":
        kw.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=m.ffn_hidden_size,
                  norm_topk_prob=m.renormalize, router_aux_loss_coef=m.aux_loss_coeff, attention_bias=cfg.out_bias)
    else:  # deepseek_v3
        first = moe_idx[0] if moe_idx else cfg.n_layers
        kw.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.mla_q_lora_rank,
                  kv_lora_rank=cfg.mla_kv_lora_rank, qk_nope_head_dim=cfg.mla_qk_nope_head_dim,
                  qk_rope_head_dim=cfg.mla_qk_rope_head_dim, v_head_dim=cfg.mla_v_head_dim,
                  rope_interleave=cfg.mla_rope_interleave, attention_bias=cfg.out_bias,
                  first_k_dense_replace=first)
        if m is not None:
            kw.update(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                      moe_intermediate_size=m.ffn_hidden_size, n_group=m.num_groups, topk_group=m.topk_groups,
                      norm_topk_prob=m.renormalize, routed_scaling_factor=m.routed_scaling_factor,
                      n_shared_experts=m.num_shared_experts)
            if m.num_shared_experts and (m.shared_expert_hidden_size or m.ffn_hidden_size) != m.ffn_hidden_size:
                raise ValueError("deepseek_v3 shared experts have the routed experts' width: set "
                                 "model.moe.shared_expert_hidden_size to model.moe.ffn_hidden_size")
    out = getattr(T, HF_CLASSES[mt][0])(**kw)
    _check_expressible(cfg, hecate_config(out), mt)
    return out


def _comparable(cfg: TransformerConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["moe_layers"] = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    if not d["moe_layers"]:
        d.pop("moe")  # no MoE layer: the MoE config is unused
    d["n_kv_heads"] = cfg.n_kv_heads or cfg.n_heads
    d["head_dim"] = cfg.head_dim or cfg.d_model // cfg.n_heads
    if cfg.attention == "mla":
        d.pop("n_kv_heads")
    flat = {}
    for k, v in d.items():
        if k == "moe":
            flat.update({f"moe.{mk}": mv for mk, mv in v.items() if mk not in TRAINING_ONLY})
        elif k not in TRAINING_ONLY:
            flat[k] = v
    if len(d["moe_layers"]) == cfg.n_layers:  # no dense FFN layer: its width and activation are unused
        flat.pop("dense_ffn_hidden", None)
        flat.pop("dense_activation", None)
    if cfg.attention != "moh":
        flat = {k: v for k, v in flat.items() if not k.startswith("moh_")}
    if cfg.attention != "bam":
        flat = {k: v for k, v in flat.items() if not k.startswith("bam_")}
    if "moe.shared_expert_hidden_size" in flat and flat.get("moe.num_shared_experts"):
        flat["moe.shared_expert_hidden_size"] = (cfg.moe.shared_expert_hidden_size or cfg.moe.ffn_hidden_size)
    return flat


def _check_expressible(cfg: TransformerConfig, back: TransformerConfig, mt: str) -> None:
    want, got = _comparable(cfg), _comparable(back)
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        shown = ", ".join(f"model.{k}={want.get(k)!r} (as {mt}: {got.get(k)!r})" for k in diff[:8])
        raise ValueError(f"this model cannot be written as Hugging Face {mt} without changing what it "
                         f"computes: {shown}; pass another model_type= or change the config")


# ---- state dicts -------------------------------------------------------------------------------
def _convert(src: Dict[str, torch.Tensor], dst_shapes: Dict[str, torch.Size], rules, to_hecate: bool,
             src_name: str) -> Dict[str, torch.Tensor]:
    out, used = {}, set()
    for rule in rules:
        s_keys, d_keys = (rule.hf, rule.hecate) if to_hecate else (rule.hecate, rule.hf)
        missing = [k for k in s_keys if k not in src]
        if missing:
            raise ValueError(f"{src_name} lacks {missing} (needed for {d_keys})")
        used.update(s_keys)
        joined = torch.cat([src[k] for k in s_keys], dim=rule.dim) if len(s_keys) > 1 else src[s_keys[0]]
        sizes = [dst_shapes[k][rule.dim] for k in d_keys]
        if joined.shape[rule.dim] != sum(sizes):
            raise ValueError(f"{src_name}: {s_keys} have {joined.shape[rule.dim]} rows along dim {rule.dim}, "
                             f"the target {d_keys} need {sizes}")
        for k, piece in zip(d_keys, joined.split(sizes, dim=rule.dim)):
            if piece.shape != dst_shapes[k]:
                raise ValueError(f"{src_name}: {s_keys} give {k} shape {tuple(piece.shape)}, expected "
                                 f"{tuple(dst_shapes[k])}")
            out[k] = piece.contiguous()
    extra = sorted(set(src) - used)
    if extra:
        raise ValueError(f"{src_name} has tensors the conversion does not place: {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    return out


def hecate_state_dict(hf_state: Dict[str, torch.Tensor], cfg: TransformerConfig, model_type: str,
                      shapes: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """HF (transformers >= 5, in memory) tensors -> MoETransformer state-dict entries."""
    return _convert(hf_state, shapes, model_rules(cfg, model_type), True, f"the {model_type} state dict")


def hf_state_dict(state: Dict[str, torch.Tensor], cfg: TransformerConfig, model_type: str,
                  shapes: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """MoETransformer tensors -> HF (transformers >= 5) state-dict entries."""
    return _convert(state, shapes, model_rules(cfg, model_type), False, "the Hecate state dict")


# Non-persistent buffers of a MoETransformer that start at zero (load counters).
TRANSIENT_ZERO_BUFFERS = ("load_since_update_E",)


def _zero_transient_buffers(model: nn.Module, saved) -> None:
    """After to_empty: zero the non-persistent buffers (not in the state dict); any other kind
    would need its own initial value, so it is an error rather than garbage memory."""
    for name, buf in model.named_buffers():
        if name in saved:
            continue
        if name.rsplit(".", 1)[-1] not in TRANSIENT_ZERO_BUFFERS:
            raise ValueError(f"from_hf cannot initialize the non-persistent buffer {name}")
        buf.zero_()


def _unused_router_bias(cfg: TransformerConfig, state) -> list:
    """The routers' aux-free bias buffers of a model without aux-free balancing (always zero)."""
    return [k for k in state if k.endswith("ffn.router.expert_bias_E")
            and not cfg.moe_config(int(k.split(".")[1])).aux_free_bias]


def _hecate_tensors(model: MoETransformer) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a single-process model (every expert local)."""
    for layer in model.moe_layers():
        if type(layer.strategy).__name__ != "LocalStrategy":
            raise ValueError(f"to_hf needs a single-process model; this one runs under "
                             f"{type(layer.strategy).__name__}: save a checkpoint and use "
                             "`hecate convert --to-hf RUN_DIR` (it loads any strategy's checkpoint)")
    return dict(model.state_dict())


# ---- public API ----------------------------------------------------------------------------------
def from_hf(model_or_dir: Union[str, os.PathLike, nn.Module], dtype: torch.dtype = torch.float32,
            device: Union[str, torch.device] = "cpu") -> MoETransformer:
    """A MoETransformer with the weights of a transformers causal LM (a model object or a
    directory `from_pretrained` reads); `model(input_ids).logits` equals the HF logits."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        T = _transformers()
        path = os.fspath(model_or_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a directory (from_hf reads a saved transformers model; "
                                    "Hecate never downloads)")
        hf_model = T.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif isinstance(model_or_dir, nn.Module) and hasattr(model_or_dir, "config"):
        hf_model = model_or_dir
    else:
        raise TypeError(f"from_hf takes a transformers model or a directory, got {type(model_or_dir).__name__}")
    cfg = hecate_config(hf_model.config)
    mt = hf_model.config.model_type
    # Built on the meta device and then given uninitialized memory: no random init of weights
    # that are overwritten anyway (minutes and a second copy for a large checkpoint).
    with torch.device("meta"):
        model = MoETransformer(cfg)
    target = model.state_dict()
    shapes = {k: v.shape for k, v in target.items()}
    # Zero-size tensors (DeepSeek-V3 with n_shared_experts=0 builds an empty shared MLP) hold nothing.
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items() if v.numel()}
    if cfg.tie_embeddings:  # the head is the embedding table itself
        hf_state.pop("lm_head.weight", None)
    tensors = hecate_state_dict(hf_state, cfg, mt, shapes)
    for k in _unused_router_bias(cfg, target):
        tensors[k] = torch.zeros(target[k].shape, dtype=target[k].dtype)
    not_set = sorted(set(target) - set(tensors))
    if not_set:
        raise ValueError(f"the {mt} checkpoint leaves Hecate tensors unset: {not_set[:8]}")
    model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    model.to(dtype)
    _zero_transient_buffers(model, target)
    model.hf_model_type = mt
    return model


def to_hf_model(model: MoETransformer, model_type: Optional[str] = None):
    """A transformers model object holding `model`'s weights (see to_hf)."""
    T = _transformers()
    if not isinstance(model, MoETransformer):
        raise TypeError(f"to_hf takes a MoETransformer, got {type(model).__name__}")
    mt = model_type or getattr(model, "hf_model_type", None) or infer_model_type(model.cfg)
    config = hf_config(model.cfg, mt)
    hf_model = getattr(T, HF_CLASSES[mt][1])(config)
    shapes = {k: v.shape for k, v in hf_model.state_dict().items() if v.numel()}
    if model.cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    state = _hecate_tensors(model)
    for k in _unused_router_bias(model.cfg, state):
        if state[k].any():
            raise ValueError(f"{k} is non-zero but model.moe.aux_free_bias is off; it has no HF form")
        del state[k]
    tensors = hf_state_dict(state, model.cfg, mt, shapes)
    not_set = sorted(set(shapes) - set(tensors))
    if not_set:
        raise ValueError(f"writing {mt}: the Hecate model leaves HF tensors unset: {not_set[:8]}")
    with torch.no_grad():
        current = hf_model.state_dict()
        for k, v in tensors.items():
            current[k].copy_(v.detach())
    return hf_model.eval()


def to_hf(model: MoETransformer, out_dir: Union[str, os.PathLike], model_type: Optional[str] = None) -> str:
    """Write `model` as a transformers checkpoint directory (safetensors + config.json) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads. Returns out_dir."""
    hf_model = to_hf_model(model, model_type)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    return out_dir
