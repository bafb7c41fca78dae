"""KV-cached decoding equals the uncached model token for token (greedy), per attention type,
for a batch of prompts of different lengths, including past max_seq_len (sliding window)."""
import pytest
import torch

from hecate.inference.kv_cache import CachedDecoder
from hecate.inference.sampling import FullDecoder, generate, pick_next
from hecate.models.transformer import MoETransformer, TransformerConfig

CASES = {
    "mha": {},
    "gqa_rope": {"n_kv_heads": 2, "rope": True},
    "qk_norm_bias": {"qk_norm": "head", "qkv_bias": True, "rope": True},
    "moh": {"attention": "moh", "moh_shared_heads": 1, "moh_top_k": 2},
    "moh_query_norm": {"attention": "moh", "moh_router": "query_norm", "moh_top_k": 2},
    "bam": {"attention": "bam", "bam_attention_experts": 2},
    "bam_shared_kv": {"attention": "bam", "bam_attention_experts": 2, "bam_shared_kv": True, "rope": True},
    "lightning": {"attention": "lightning"},
    "parallel_block": {"parallel_block": True, "rope": True},
    "mla": {"attention": "mla", "rope": True, "head_dim": 8, "mla_kv_lora_rank": 16, "mla_q_lora_rank": 16,
            "mla_qk_nope_head_dim": 8, "mla_qk_rope_head_dim": 8, "mla_v_head_dim": 8},
}
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def model_of(extra):
    torch.manual_seed(0)
    return MoETransformer(TransformerConfig(n_layers=2, moe_every=1, max_seq_len=16, **extra)).eval()


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_cached_logits_and_tokens_equal_uncached(name):
    model = model_of(CASES[name])
    cached, full = CachedDecoder(model, PROMPTS), FullDecoder(model, PROMPTS)
    tokens = []
    for step in range(8):  # the longest row (11 tokens) passes max_seq_len=16 at step 5
        a, b = cached.logits(), full.logits()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        nxt = pick_next(b)
        assert torch.equal(pick_next(a), nxt)
        cached.append(nxt)
        full.append(nxt)
        tokens.append(nxt)
    assert len({tuple(t.tolist()) for t in tokens}) > 1  # the rows do change: not a fixed point


def test_generate_cached_equals_uncached():
    model = model_of(CASES["gqa_rope"])
    assert generate(model, PROMPTS, 8, use_cache=True) == generate(model, PROMPTS, 8, use_cache=False)


def test_sampling_cuts():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert pick_next(logits).item() == 3
    seen = {pick_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert seen == {2, 3}
    # probs ~ [.03, .09, .24, .64]: top_p=0.7 keeps {3, 2}; 0.5 keeps {3}
    assert {pick_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)} == {2, 3}
    assert {pick_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {3}
    with pytest.raises(ValueError, match="top_p"):
        pick_next(logits, 1.0, top_p=0)


def test_generate_benchmark_smoke():
    """benchmarks/generate.py runs at its smallest settings and reports both paths (no timing asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "generate.py"), "--tokens", "6",
                           "--sizes", "tiny", "--batch", "2", "--prompt-len", "5", "--repeat", "1", "--json"],
                          cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])["sizes"]["tiny"]
    assert row["same_tokens"] is True and row["new_tokens"] == 12
    assert row["cached_tok_s"] > 0 and row["uncached_tok_s"] > 0
    # K and V of 2 layers x 2 kv heads x 16 dims x 4 bytes per slot, 5 + 6 slots, 2 rows
    assert row["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (5 + 6) * 2


def test_cache_refuses_other_models_by_name():
    with pytest.raises(ValueError, match="not Linear.*--no-cache"):
        CachedDecoder(torch.nn.Linear(2, 2), [[1]])


# ---- the decode step's fast paths equal the general code they stand in for ----------------------

from hecate.inference.kv_cache import KVState, _attend, moe_decode, moe_decode_applies  # noqa: E402
from hecate.moe import MoEConfig, MoELayer  # noqa: E402
from hecate.moe.overrides import routing_overrides  # noqa: E402

MOE_CASES = {
    "topk": {},
    "sigmoid_aux_free": {"score_func": "sigmoid", "aux_free_bias": True, "top_k": 3},
    "shared_gate_scaled": {"num_shared_experts": 1, "shared_expert_gate": True, "routed_scaling_factor": 2.5},
    "residual_swiglu": {"use_residual": True, "activation": "swiglu"},
    "biased_experts": {"expert_bias": True, "router_bias": True},
    "capacity_drops": {"eval_capacity_factor": 0.5, "min_capacity": 1},
    "expert_choice": {"router": "expert_choice"},
    "aux_losses": {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001},
}


@pytest.mark.parametrize("name", list(MOE_CASES))
@pytest.mark.parametrize("rows", [1, 5])
@torch.no_grad()
def test_moe_decode_equals_the_layer(name, rows):
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=6, **MOE_CASES[name])).eval()
    if layer.config.aux_free_bias:
        layer.router.expert_bias_E.normal_()
    x = torch.randn(rows, 1, 16)
    assert moe_decode_applies(layer, x)
    torch.testing.assert_close(moe_decode(layer, x), layer(x).y, rtol=1e-6, atol=1e-6)
    if name == "topk":  # overrides (a disabled and a forced expert) reach the fast path too
        with routing_overrides(layer, disabled=[0], forced=[5]):
            torch.testing.assert_close(moe_decode(layer, x), layer(x).y, rtol=1e-6, atol=1e-6)
    if name == "capacity_drops" and rows > 1:  # the case does drop entries
        assert bool((layer.prepare(x)[1].indices_TK < 0).any())


def test_moe_decode_applies_only_where_it_is_exact():
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4))
    x = torch.randn(1, 1, 16)
    assert not moe_decode_applies(layer, x)  # training mode: the layer's own forward
    layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not moe_decode_applies(layer, x)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_without_repeat(heads, masked):
    H, G = heads
    q, k, v = torch.randn(3, H, 2, 8), torch.randn(3, G, 7, 8), torch.randn(3, G, 7, 8)
    mask = torch.rand(3, 2, 7) > 0.3 if masked else None
    if masked:
        mask[:, :, 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1),
        attn_mask=None if mask is None else mask[:, None])
    torch.testing.assert_close(_attend(q, k, v, mask), ref, rtol=1e-6, atol=1e-6)


def test_kv_state_grows_in_place_like_a_concatenation():
    st, ks, vs = KVState(capacity=3), [], []
    for S in (2, 1, 1, 4, 1):  # past the reserved 3 slots: the buffers double
        k, v = torch.randn(2, 1, S, 4), torch.randn(2, 1, S, 5)
        ks.append(k)
        vs.append(v)
        got_k, got_v = st.extend("", k, v)
        assert torch.equal(got_k, torch.cat(ks, 2)) and torch.equal(got_v, torch.cat(vs, 2))
    assert [(a.shape, b.shape) for a, b in st.cached()] == [((2, 1, 9, 4), (2, 1, 9, 5))]


@pytest.mark.parametrize("case", ["gqa_rope", "parallel_block"])
@torch.no_grad()
def test_the_cached_decoder_runs_the_models_own_norms(case):
    """One RMSNorm implementation: every norm module of the model runs once per cached forward
    (prefill, then each step), so the decoder normalizes with the model's code."""
    from hecate.models.transformer import RMSNorm

    model = model_of(CASES[case])
    norms = [m for m in model.modules() if type(m) is RMSNorm]
    calls = {id(m): 0 for m in norms}
    for m in norms:
        m.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    decoder = CachedDecoder(model, [[1, 2, 3], [4, 5]], reserve=2)
    for _ in range(3):
        decoder.append(decoder.logits().argmax(-1))
    assert len(norms) >= 2 and set(calls.values()) == {3}


@pytest.mark.parametrize("prompts", [[[5, 6, 7]], [[1, 2, 3, 4], [9, 8, 7, 6]]])
@torch.no_grad()
def test_unpadded_batches_decode_without_a_mask(prompts):
    """Rows of one length (no left padding) take the mask-free decode step; logits still equal."""
    model = model_of(CASES["gqa_rope"])
    cached, full = CachedDecoder(model, prompts, reserve=4), FullDecoder(model, prompts)
    for step in range(16):  # past max_seq_len=16 for the longer prompts
        a, b = cached.logits(), full.logits()
        assert step > 0 or cached.real_BK is None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        cached.append(pick_next(b))
        full.append(pick_next(b))


def test_generate_probes_grouped_gemm_under_inference_mode():
    """generate() runs under torch.inference_mode; the grouped-GEMM probe, when it runs first
    there, must still find torch._grouped_mm usable (not switch the process to the loop)."""
    from hecate.moe import experts

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    experts._auto_impl.cache_clear()
    try:
        with torch.inference_mode():
            assert experts.auto_impl(torch.device("cpu"), torch.float32) == "grouped_mm"
    finally:
        experts._auto_impl.cache_clear()
