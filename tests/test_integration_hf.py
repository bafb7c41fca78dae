"""Hugging Face conversion: transformers itself is the oracle (tiny random models built from
its config classes, nothing downloaded). Logits equal within 1e-4 in fp32; the round trip
Hecate -> HF directory -> transformers returns identical tensors."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hecate.integrations.hf import from_hf, hecate_config, hf_config, to_hf  # noqa: E402
from hecate.models.transformer import MoETransformer, TransformerConfig  # noqa: E402
from hecate.moe.config import MoEConfig  # noqa: E402

SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, intermediate_size=40, rms_norm_eps=1e-5)


def _config(kind: str, k: int = 2, norm: bool = False, **extra):
    T = transformers
    if kind == "llama":
        return T.LlamaConfig(**SMALL, head_dim=8, attention_bias=True, **extra)  # noqa: E501
    if kind == "mixtral":
        extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000.0})
        return T.MixtralConfig(**SMALL, num_local_experts=5, num_experts_per_tok=k, **extra)
    if kind == "qwen2_moe":
        return T.Qwen2MoeConfig(**SMALL, num_experts=5, num_experts_per_tok=k, moe_intermediate_size=24,
                                shared_expert_intermediate_size=36, mlp_only_layers=[1], norm_topk_prob=norm,
                                **extra)
    if kind == "qwen3_moe":
        return T.Qwen3MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=k, moe_intermediate_size=16,
                                head_dim=12, norm_topk_prob=norm, decoder_sparse_step=2, **extra)
    if kind == "olmoe":
        return T.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=k, norm_topk_prob=norm, **extra)
    if kind == "deepseek_v3":
        return T.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=k, moe_intermediate_size=16,
                                  n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=12,
                                  kv_lora_rank=10, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5,
                                  n_shared_experts=2, routed_scaling_factor=1.7, norm_topk_prob=norm, **extra)
    raise AssertionError(kind)


def _hf_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # non-trivial values everywhere (HF inits norms to 1, biases to 0)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else p.copy_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    return model


def _tokens(vocab, seed=1, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _check_logits(hf_model, model, vocab):
    ids = _tokens(vocab)
    with torch.no_grad():
        want = hf_model(input_ids=ids).logits
        got = model(ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


KINDS = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind):
    hf_model = _hf_model(_config(kind))
    model = from_hf(hf_model).eval()
    _check_logits(hf_model, model, SMALL["vocab_size"])
    # built without random init: the transient load counters must still start at zero
    assert all(int(layer.load_since_update_E.abs().sum()) == 0 for layer in model.moe_layers())


@pytest.mark.parametrize("kind,k,norm", [("mixtral", 1, True), ("mixtral", 4, True), ("qwen2_moe", 1, True),
                                         ("qwen2_moe", 3, False), ("qwen3_moe", 4, True), ("olmoe", 3, False),
                                         ("olmoe", 1, True), ("deepseek_v3", 1, True), ("deepseek_v3", 3, False),
                                         ("deepseek_v3", 4, True)])
def test_odd_sizes(kind, k, norm):
    hf_model = _hf_model(_config(kind, k=k, norm=norm), seed=k)
    _check_logits(hf_model, from_hf(hf_model).eval(), SMALL["vocab_size"])


def test_variants_tied_no_q_lora_no_shared():
    T = transformers
    variants = [
        T.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True),
        T.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1,
                           topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8,
                           qk_rope_head_dim=6, qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=0,
                           rope_interleave=False, attention_bias=True),
        T.Qwen2MoeConfig(**SMALL, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24,
                         shared_expert_intermediate_size=16, qkv_bias=False, decoder_sparse_step=2),
    ]
    for i, c in enumerate(variants):
        hf_model = _hf_model(c, seed=10 + i)
        _check_logits(hf_model, from_hf(hf_model).eval(), SMALL["vocab_size"])


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_a_directory(kind, tmp_path):
    hf_model = _hf_model(_config(kind), seed=3)
    hf_model.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    assert model.hf_model_type == kind
    out = to_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.model_type == kind
    src, dst = hf_model.state_dict(), back.state_dict()
    assert set(src) == set(dst)
    for key in src:
        assert torch.equal(src[key], dst[key]), key
    again = from_hf(back)
    for key, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[key]), key
    _check_logits(back, again.eval(), SMALL["vocab_size"])


def test_to_hf_infers_architecture_and_refuses_what_it_cannot_express():
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2, activation="swiglu")
    cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, dense_ffn_hidden=24, moe_every=1,
                            rope=True, dense_activation="swiglu", tie_embeddings=False, moe=moe)
    hf = hf_config(cfg)
    assert hf.model_type == "mixtral"
    assert hecate_config(hf).moe.num_experts == 4
    model = MoETransformer(cfg).eval()
    back = from_hf(transformers.MixtralForCausalLM(hf).eval())  # shapes agree; weights replaced below
    from hecate.integrations.hf import to_hf_model
    hf_model = to_hf_model(model)
    _check_logits(hf_model, model, 50)
    assert back.cfg.moe.top_k == 2
    # renormalize=False has no Mixtral form; learned positions and GeLU have no HF form here.
    with pytest.raises(ValueError, match="renormalize"):
        hf_config(TransformerConfig(**{**cfg.__dict__, "moe": moe.replace(renormalize=False)}), "mixtral")
    with pytest.raises(ValueError, match="rope"):
        hf_config(TransformerConfig(**{**cfg.__dict__, "rope": False}))
    with pytest.raises(ValueError, match="moe_layers"):  # Mixtral has no dense layers
        hf_config(TransformerConfig(**{**cfg.__dict__, "moe_every": 2}))
    with pytest.raises(ValueError, match="dense_activation"):
        hf_config(TransformerConfig(**{**cfg.__dict__, "moe_every": 2, "dense_activation": "gelu",
                                       "qk_norm": "head"}), "qwen3_moe")


def test_unsupported_hf_options_are_refused():
    T = transformers
    with pytest.raises(ValueError, match="rope_type"):
        hecate_config(T.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="sliding_window"):
        hecate_config(T.MixtralConfig(**SMALL, sliding_window=16))
    with pytest.raises(ValueError, match="hidden_act"):
        hecate_config(T.LlamaConfig(**SMALL, hidden_act="gelu"))
    with pytest.raises(ValueError, match="clip_qkv"):
        hecate_config(T.OlmoeConfig(**SMALL, clip_qkv=4.0))
    with pytest.raises(ValueError, match="model_type"):
        hecate_config(T.GPT2Config())


ROPE_SCALINGS = [
    ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    ("mixtral", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ("qwen3_moe", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}),
    ("deepseek_v3", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),   # DeepSeek-V3's form
    ("deepseek_v3", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
                     "mscale": 0.707, "mscale_all_dim": 1.0}),
]


@pytest.mark.parametrize("kind,rope", ROPE_SCALINGS)
def test_rope_scaling_matches_transformers_and_round_trips(kind, rope, tmp_path):
    hf_model = _hf_model(_config(kind, rope_parameters=dict(rope)), seed=7)
    model = from_hf(hf_model).eval()
    assert model.cfg.rope_scaling["type"] == rope["rope_type"]
    ids = _tokens(SMALL["vocab_size"], shape=(2, 40))  # past original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    back = transformers.AutoModelForCausalLM.from_pretrained(to_hf(model, tmp_path / "out"), dtype=torch.float32)
    assert back.config.rope_parameters["rope_type"] == rope["rope_type"]
    assert from_hf(back).cfg == model.cfg
