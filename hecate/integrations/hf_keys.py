"""Key mapping between Hugging Face `transformers` causal-LM state dicts and MoETransformer.

Every rule pairs a list of Hecate keys with a list of HF keys whose tensors, concatenated
along `dim`, are the same tensor: a rename is one key on each side; the fused q/k/v
projection is one Hecate key and three HF keys (dim 0); an expert stack is two Hecate keys
(w1 gate, w3 up) and one HF `gate_up_proj` (dim 1, gate rows first). Converting in either
direction concatenates one side and splits it to the other side's sizes, so no tensor is
changed, only renamed, joined or cut. docs/hf.md prints these tables.

HF names are those of transformers >= 5 in memory (fused 3-D expert stacks); checkpoints
in the older per-expert layout are read through transformers, which converts them on load.
"""
from __future__ import annotations

from typing import List, NamedTuple


class Rule(NamedTuple):
    hecate: List[str]
    hf: List[str]
    dim: int = 0


# Outside the blocks. The head is absent when the embeddings are tied.
TOP = [Rule(["embed.weight"], ["model.embed_tokens.weight"]),
       Rule(["norm.weight"], ["model.norm.weight"])]
HEAD = Rule(["head.weight"], ["lm_head.weight"])

# Per block i: Hecate prefix `blocks.{i}.`, HF prefix `model.layers.{i}.`.
NORMS = [Rule(["norm1.weight"], ["input_layernorm.weight"]),
         Rule(["norm2.weight"], ["post_attention_layernorm.weight"])]

MHA = [Rule(["attn.qkv.weight"], ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"]),
       Rule(["attn.out.weight"], ["self_attn.o_proj.weight"])]
MHA_QKV_BIAS = [Rule(["attn.qkv.bias"], ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                         "self_attn.v_proj.bias"])]
MHA_OUT_BIAS = [Rule(["attn.out.bias"], ["self_attn.o_proj.bias"])]
QK_NORM = [Rule(["attn.q_norm.weight"], ["self_attn.q_norm.weight"]),
           Rule(["attn.k_norm.weight"], ["self_attn.k_norm.weight"])]

MLA_Q_FULL = [Rule(["attn.q_proj.weight"], ["self_attn.q_proj.weight"])]
MLA_Q_LORA = [Rule(["attn.q_a.weight"], ["self_attn.q_a_proj.weight"]),
              Rule(["attn.q_a_norm.weight"], ["self_attn.q_a_layernorm.weight"]),
              Rule(["attn.q_b.weight"], ["self_attn.q_b_proj.weight"])]
MLA_Q_LORA_BIAS = [Rule(["attn.q_a.bias"], ["self_attn.q_a_proj.bias"])]
MLA_KV = [Rule(["attn.kv_a.weight"], ["self_attn.kv_a_proj_with_mqa.weight"]),
          Rule(["attn.kv_a_norm.weight"], ["self_attn.kv_a_layernorm.weight"]),
          Rule(["attn.kv_b.weight"], ["self_attn.kv_b_proj.weight"]),
          Rule(["attn.out.weight"], ["self_attn.o_proj.weight"])]
MLA_BIAS = [Rule(["attn.kv_a.bias"], ["self_attn.kv_a_proj_with_mqa.bias"]),
            Rule(["attn.out.bias"], ["self_attn.o_proj.bias"])]

DENSE_MLP = [Rule(["ffn.fc1.weight"], ["mlp.gate_proj.weight"]),
             Rule(["ffn.fc3.weight"], ["mlp.up_proj.weight"]),
             Rule(["ffn.fc2.weight"], ["mlp.down_proj.weight"])]

MOE = [Rule(["ffn.router.weight_ED"], ["mlp.gate.weight"]),
       Rule(["ffn.experts.w1_EFD", "ffn.experts.w3_EFD"], ["mlp.experts.gate_up_proj"], dim=1),
       Rule(["ffn.experts.w2_EDF"], ["mlp.experts.down_proj"])]
ROUTER_BIAS = [Rule(["ffn.router.expert_bias_E"], ["mlp.gate.e_score_correction_bias"])]


def shared_expert_rules(hf_module: str) -> List[Rule]:
    """Shared experts (one fused MLP): Qwen2-MoE `shared_expert`, DeepSeek-V3 `shared_experts`."""
    return [Rule(["ffn.shared_experts.w1_FD"], [f"mlp.{hf_module}.gate_proj.weight"]),
            Rule(["ffn.shared_experts.w3_FD"], [f"mlp.{hf_module}.up_proj.weight"]),
            Rule(["ffn.shared_experts.w2_DF"], [f"mlp.{hf_module}.down_proj.weight"])]


SHARED_GATE = [Rule(["ffn.shared_gate.weight"], ["mlp.shared_expert_gate.weight"])]


def block_rules(cfg, i: int, model_type: str) -> List[Rule]:
    """The rules of block i of a TransformerConfig converted from / to `model_type`."""
    rules = list(NORMS)
    if cfg.attention == "mla":
        if cfg.mla_q_lora_rank is None:
            rules += MLA_Q_FULL
        else:
            rules += MLA_Q_LORA + (MLA_Q_LORA_BIAS if cfg.out_bias else [])
        rules += MLA_KV + (MLA_BIAS if cfg.out_bias else [])
    else:
        rules += MHA + (MHA_QKV_BIAS if cfg.qkv_bias else []) + (MHA_OUT_BIAS if cfg.out_bias else [])
        rules += QK_NORM if cfg.qk_norm != "none" else []
    if not cfg.is_moe_layer(i):
        return rules + DENSE_MLP
    moe = cfg.moe_config(i)
    rules += MOE
    if moe.aux_free_bias:
        rules += ROUTER_BIAS
    if moe.num_shared_experts:
        rules += shared_expert_rules("shared_expert" if model_type == "qwen2_moe" else "shared_experts")
    if moe.shared_expert_gate:
        rules += SHARED_GATE
    return rules


def model_rules(cfg, model_type: str) -> List[Rule]:
    """Every rule of the model, with full key names."""
    rules = list(TOP) + ([] if cfg.tie_embeddings else [HEAD])
    for i in range(cfg.n_layers):
        for r in block_rules(cfg, i, model_type):
            rules.append(Rule([f"blocks.{i}.{k}" for k in r.hecate], [f"model.layers.{i}.{k}" for k in r.hf],
                              r.dim))
    return rules
