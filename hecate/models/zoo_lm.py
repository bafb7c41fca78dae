"""Language-model presets of the zoo: GPT-MoE (Hecate), DeepSpeed PR-MoE, DeepSeekMoE, MoH
and BAM. Every one is a configuration of the `transformer` architecture (MoETransformer),
so each trains through the same trainer and strategies; expert FFNs are MoELayers (sharded
by dp/ep/fsdp/fssdp), MoH heads and BAM attention branches are dense (data parallel).

Paper-size presets follow /work/shared/PAPERS.md; where a paper leaves a number open the
choice is marked "(ours)" in the preset's description. `tiny-*` presets train in tests.
"""
from __future__ import annotations

from hecate.models.registry import register_preset

NO_MOE = 10 ** 6  # moe_every for models without MoE FFNs (no layer index i has (i+1) % NO_MOE == 0)


def _moe(d_model: int, ffn: int, experts: int, top_k: int, **extra) -> dict:
    return {"hidden_size": d_model, "ffn_hidden_size": ffn, "num_experts": experts, "top_k": top_k, **extra}


def _lm(d_model, n_layers, n_heads, vocab, seq, dense_ffn, moe, **extra) -> dict:
    return {"vocab_size": vocab, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
            "max_seq_len": seq, "dense_ffn_hidden": dense_ffn, "moe": moe, **extra}


def _register(name: str, config: dict, description: str) -> None:
    register_preset(name, "transformer", config, description)


# ---- GPT-MoE (Hecate paper, Table 1: every FFN replaced by an MoE layer of 64 experts, GShard top-2,
# d_ffn = 2 d_model, sequence 2048, 12 layers). The table's "Params" (1.84B / 7.36B) counts the
# transformer layers without the embeddings (hecate.models.paper_sizes checks this). ----
def gpt_moe(d_model: int, n_heads: int) -> dict:
    return _lm(d_model, 12, n_heads, 50257, 2048, 2 * d_model,
               _moe(d_model, 2 * d_model, 64, 2, aux_loss_coeff=0.01), moe_every=1)


_register("gpt-moe-s", gpt_moe(768, 12),
          "GPT-MoE-S of the Hecate/FSSDP paper (arXiv 2502.02581, Table 1): d 768, seq 2048, 12 layers, "
          "every FFN an MoE of 64 experts, GShard top-2, d_ffn = 2 d (1.84B without embeddings); "
          "12 heads, GPT-2 vocab, dropless (ours)")
_register("gpt-moe-l", gpt_moe(1536, 16),
          "GPT-MoE-L of the Hecate/FSSDP paper (Table 1): d 1536, seq 2048, 12 layers, every FFN an MoE of "
          "64 experts, GShard top-2, d_ffn = 2 d (7.36B without embeddings); 16 heads, GPT-2 vocab (ours)")


# ---- DeepSpeed-MoE: 350M / 1.3B bases, MoE every second layer, top-1, PR-MoE pyramid + residual ----
def deepspeed(d_model: int, experts: int, pyramid: list | None, residual: bool) -> dict:
    moe = _moe(d_model, 4 * d_model, experts, 1, capacity_factor=1.0, eval_capacity_factor=1.0,
               min_capacity=4, aux_loss_coeff=0.01, use_residual=residual)
    return _lm(d_model, 24, 16, 50257, 2048, 4 * d_model, moe, moe_every=2, moe_experts_per_layer=pyramid)


_register("ds-350m-moe-128", deepspeed(1024, 128, None, False),
          "DeepSpeed-MoE (Rajbhandari et al., 2022) 350M+MoE-128: 24 layers, d 1024, 16 heads, "
          "GeLU MLP 4d, 128 top-1 experts in every second layer (12 MoE layers), capacity 1.0")
_register("ds-350m-prmoe-32-64", deepspeed(1024, 32, [32] * 10 + [64] * 2, True),
          "DeepSpeed-MoE 350M+PR-MoE-32/64: pyramid (32 experts in 10 MoE layers, 64 in the last 2) "
          "and residual MoE (dense MLP + one top-1 expert mixed by softmax(Linear(d, 2)))")
_register("ds-1.3b-moe-128", deepspeed(2048, 128, None, False),
          "DeepSpeed-MoE 1.3B+MoE-128: 24 layers, d 2048, 16 heads, 128 top-1 experts in every second layer "
          "(52B in the paper's Table 4)")
_register("ds-1.3b-prmoe-64-128", deepspeed(2048, 64, [64] * 10 + [128] * 2, True),
          "DeepSpeed-MoE 1.3B+PR-MoE-64/128: 24 layers, d 2048, 16 heads, pyramid 64 then 128 "
          "experts (last 2 MoE layers), residual MoE")


# ---- DeepSeekMoE: fine-grained + shared experts, no top-k renormalization, SwiGLU, RoPE, untied ----
def deepseek(d_model, n_layers, n_heads, vocab, seq, routed, shared, top_k, expert_ffn, dense_ffn,
             first_dense, alpha1) -> dict:
    moe = _moe(d_model, expert_ffn, routed, top_k, activation="swiglu", num_shared_experts=shared,
               renormalize=False, expert_balance_coeff=alpha1)
    return _lm(d_model, n_layers, n_heads, vocab, seq, dense_ffn, moe, moe_every=1,
               first_dense_layers=first_dense, dense_activation="swiglu", rope=True, tie_embeddings=False,
               head_dim=128)


_register("deepseekmoe-2b", deepseek(1280, 9, 10, 8192, 2048, 63, 1, 7, 853, 3413, 0, 0.01),
          "DeepSeekMoE 2B (Dai et al., 2024): 9 layers, d 1280, 10 heads x 128, vocab 8K, 1 shared + 63 "
          "routed experts, top-7, expert width 0.25 of a standard SwiGLU FFN (8/3 d = 3413 -> 853, ours), "
          "alpha1 0.01, no top-k renormalization")
_register("deepseekmoe-16b", deepseek(2048, 28, 16, 102400, 4096, 64, 2, 6, 1408, 10944, 1, 0.001),
          "DeepSeekMoE 16B: 28 layers, d 2048, 16 heads x 128, vocab 102400, first layer dense (FFN 10944), "
          "2 shared + 64 routed experts, top-6, expert width 1408, alpha1 0.001, RoPE, untied, SwiGLU")

_register("deepseekmoe-145b", deepseek(4096, 62, 32, 102400, 4096, 128, 4, 12, 1408, 21888, 1, 0.003),
          "DeepSeekMoE 145B (Table 7 / Table 6): 62 layers, d 4096, 32 heads x 128, 4 shared + 128 routed "
          "experts, top-12, relative expert size 0.125 (0.125 x 2.75 d = 1408), seq 4096; first layer dense "
          "with FFN 21888 (the 16B's 10944 scaled with d, ours), vocab 102400 (as the 16B), alpha1 0.003 (ours)")


# ---- MoHD: Mixture of Hidden Dimensions (Chen et al., ICML 2025, arXiv 2412.05644). The paper
# pretrains vanilla LLaMA-architecture models of 355M / 495M / 1.13B (Sheared-LLaMA codebase) and
# their MoHD versions at compression (50%, 75%) and expansion (2x, 3x, 4x) settings; its layout
# table was not available to us, so every layout below is ours: RoPE, SwiGLU, LLaMA's 32,000-token
# vocabulary, untied, with d / layers / heads / FFN chosen so that the vanilla model (MoHD off) has
# the paper's total (hecate.models.paper_sizes checks it):
#   355M: d 1024, 24 layers, 16 heads x 64, FFN 2560      (354,993,152)
#   495M: d 1152, 28 layers, 18 heads x 64, FFN 2816      (494,928,000)
#   1.13B: d 2048, 20 layers, 16 heads x 128, FFN 5376    (1,127,303,168; Sheared-LLaMA-1.3B's width
#          and heads, fewer layers and FFN 2.625 d)
# MoHD on the FFN as in the paper's 50% compression setting: 16 sub-dimensions, 4 shared + top-4 of
# 12 routed (the split into 16 and 4 + 4 is ours). ----
def mohd_llama(d_model, n_layers, n_heads, ffn, sub_dims, shared, top_k) -> dict:
    return _lm(d_model, n_layers, n_heads, 32000, 2048, ffn, _moe(d_model, ffn, 1, 1), moe_every=NO_MOE,
               dense_activation="swiglu", rope=True, tie_embeddings=False, mohd_sub_dims=sub_dims,
               mohd_shared=shared, mohd_top_k=top_k)


_register("mohd-355m", mohd_llama(1024, 24, 16, 2560, 16, 4, 4),
          "MoHD on the paper's 355M vanilla LLaMA-architecture model (MoHD, arXiv 2412.05644; layout ours: "
          "d 1024, 24 layers, 16 heads, SwiGLU FFN 2560, vocab 32,000, untied): every FFN split into 16 "
          "sub-dimensions, 4 shared + top-4 of 12 routed (50% of the FFN units per token), activation "
          "scaling, group fusion")
_register("mohd-495m", mohd_llama(1152, 28, 18, 2816, 16, 4, 4),
          "MoHD on the paper's 495M vanilla LLaMA-architecture model (MoHD, arXiv 2412.05644; layout ours: "
          "d 1152, 28 layers, 18 heads x 64, SwiGLU FFN 2816, vocab 32,000, untied): every FFN split into 16 "
          "sub-dimensions of 176 units, 4 shared + top-4 of 12 routed (the paper's 50% setting; the split "
          "is ours), activation scaling, group fusion")
_register("mohd-1.13b", mohd_llama(2048, 20, 16, 5376, 16, 4, 4),
          "MoHD on the paper's 1.13B vanilla LLaMA-architecture model (MoHD, arXiv 2412.05644; layout ours: "
          "d 2048, 20 layers, 16 heads x 128, SwiGLU FFN 5376, vocab 32,000, untied): every FFN split into 16 "
          "sub-dimensions of 336 units, 4 shared + top-4 of 12 routed (the paper's 50% setting; the split "
          "is ours), activation scaling, group fusion")


# ---- MoH: Mixture-of-Head attention (dense SwiGLU FFN, RoPE) ----
def moh(d_model, n_layers, n_heads, ffn, vocab, seq, shared, top_k, **extra) -> dict:
    return _lm(d_model, n_layers, n_heads, vocab, seq, ffn, _moe(d_model, ffn, 1, 1), moe_every=NO_MOE,
               attention="moh", moh_shared_heads=shared, moh_top_k=top_k, dense_activation="swiglu",
               rope=True, tie_embeddings=False, **extra)


_register("moh-llm-s", moh(768, 12, 12, 2048, 65536, 2048, 6, 3),
          "MoH-LLM-S (Jin et al., 2024, Table C): 12 layers, d 768, FFN 2048, 12 heads x 64, 186M; 6 shared + "
          "top-3 of 6 routed heads (75% active), vocab 65,536 (the paper's tokenizer), untied; SwiGLU/RoPE (ours)")
_register("moh-llm-b", moh(1536, 24, 16, 4096, 65536, 2048, 8, 4),
          "MoH-LLM-B (Table C): 24 layers, d 1536, FFN 4096, 16 heads x 96, 882M; 8 shared + top-4 of 8 "
          "routed heads (75% active), vocab 65,536, untied; SwiGLU/RoPE (ours)")
_register("moh-llama3-8b", moh(4096, 32, 32, 14336, 128256, 8192, 16, 8, n_kv_heads=8, rope_theta=500000.0,
                               moh_router="query_norm"),
          "MoH-LLaMA3-8B layout: LLaMA3-8B (32 layers, d 4096, FFN 14336, GQA 8 KV heads) with 32 query heads "
          "= 16 shared + top-8 of 16 routed (75% active), parameter-free query-norm router for conversion")


# ---- BAM: parallel blocks, soft-routed attention experts, top-1 FFN experts ----
# The paper's "FFN dimension" (Table 8: 4096 small, 18432 large) is the width of the SwiGLU input
# projection, gate and up halves together: Table 9 lists ffn_exp 1024 x 4096 and ffn_red 2048 x 1024
# per block, so the SwiGLU hidden width is half of it (2048 / 9216). That gives the 590M / 2B seeds.
def bam(d_model, n_layers, n_heads, n_kv, ffn_dimension, vocab, seq, tied, shared_kv, experts=4) -> dict:
    hidden = ffn_dimension // 2
    moe = _moe(d_model, hidden, experts, 1, activation="swiglu", aux_loss_coeff=0.01, z_loss_coeff=0.001)
    return _lm(d_model, n_layers, n_heads, vocab, seq, hidden, moe, moe_every=1, n_kv_heads=n_kv,
               dense_activation="swiglu", rope=True, tie_embeddings=tied, attention="bam",
               bam_attention_experts=experts, bam_shared_kv=shared_kv, parallel_block=True)


for _kv, _suffix in ((False, ""), (True, "-shared-kv")):
    _register(f"bam-small{_suffix}", bam(1024, 6, 8, 8, 4096, 256000, 4096, False, _kv),
              "BAM (Zhang et al., 2024, Tables 8-9) small: upcycled from the 590M seed (6 layers, d 1024, FFN "
              "dimension 4096 = SwiGLU hidden 2048, 8 heads / 8 KV heads, vocab 256K, RoPE, untied), parallel "
              f"blocks; 4 soft-routed attention experts ({'K/V shared' if _kv else 'each with its own K/V'}), "
              "4 top-1 FFN experts (balance + z-loss)")
    _register(f"bam-large{_suffix}", bam(2304, 18, 18, 6, 18432, 256000, 4096, True, _kv),
              "BAM large: upcycled from the 2B seed (18 layers, d 2304, FFN dimension 18432 = SwiGLU hidden "
              f"9216, 18 heads / 6 KV heads, tied); 4 attention experts ({'K/V shared' if _kv else 'own K/V'}), "
              "4 top-1 FFN experts")


# ---- tiny presets: train in seconds on CPU (tests, configs/models/*.yaml) ----
TINY = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dense_ffn_hidden=48)

_register("tiny-gpt-moe", {**TINY, "moe_every": 1, "moe": _moe(32, 64, 4, 2, aux_loss_coeff=0.01)},
          "tiny GPT-MoE (GShard top-2, d_ffn = 2 d) for tests")
_register("tiny-prmoe", {**TINY, "n_layers": 4, "moe_every": 2, "moe_experts_per_layer": [2, 4],
                         "moe": _moe(32, 48, 2, 1, aux_loss_coeff=0.01, use_residual=True)},
          "tiny DeepSpeed PR-MoE: MoE every second layer, pyramid [2, 4] experts, residual MoE, top-1")
_register("tiny-deepseek", {**TINY, "n_layers": 3, "moe_every": 1, "first_dense_layers": 1,
                            "dense_activation": "swiglu", "rope": True, "tie_embeddings": False,
                            "moe": _moe(32, 16, 8, 3, activation="swiglu", num_shared_experts=1,
                                        renormalize=False, expert_balance_coeff=0.01,
                                        device_balance_coeff=0.01, num_devices=2)},
          "tiny DeepSeekMoE: first layer dense, 1 shared + 8 fine-grained routed experts, top-3 without "
          "renormalization, expert- and device-level balance, SwiGLU, RoPE, untied")
_register("tiny-moh", {**TINY, "n_heads": 4, "n_kv_heads": 2, "rope": True, "attention": "moh",
                       "moh_shared_heads": 1, "moh_top_k": 2, "dense_activation": "swiglu", "moe_every": 2,
                       "moe": _moe(32, 48, 4, 2, aux_loss_coeff=0.01)},
          "tiny MoH: 1 shared + top-2 of 3 routed heads, GQA (2 KV heads), RoPE, learned router with "
          "head balance loss; an MoE FFN in the second layer so the strategies have experts to shard")
_register("tiny-mohd", {**TINY, "dense_activation": "swiglu", "rope": True, "mohd_sub_dims": 4, "mohd_shared": 1,
                        "mohd_top_k": 2, "moe_every": 2, "moe": _moe(32, 48, 4, 2, aux_loss_coeff=0.01)},
          "tiny MoHD: the dense SwiGLU FFN (48 units) split into 4 sub-dimensions, 1 shared + top-2 of 3 "
          "routed (36 of 48 units per token), activation scaling and group fusion; an MoE FFN in the "
          "second layer so the strategies have experts to shard")
_register("tiny-bam", {**TINY, "rope": True, "attention": "bam", "bam_attention_experts": 2,
                       "parallel_block": True, "dense_activation": "swiglu", "moe_every": 1,
                       "moe": _moe(32, 48, 2, 1, activation="swiglu", aux_loss_coeff=0.01, z_loss_coeff=0.001)},
          "tiny BAM: parallel blocks, 2 soft-routed attention experts (own K/V), 2 top-1 FFN experts")
_register("tiny-bam-shared-kv", {**TINY, "rope": True, "attention": "bam", "bam_attention_experts": 2,
                                 "bam_shared_kv": True, "parallel_block": True, "dense_activation": "swiglu",
                                 "moe_every": 1, "n_kv_heads": 2,
                                 "moe": _moe(32, 48, 2, 1, activation="swiglu", aux_loss_coeff=0.01,
                                             z_loss_coeff=0.001)},
          "tiny BAM, K/V-shared variant: 2 attention experts sharing one K/V projection (GQA 2 KV heads)")
