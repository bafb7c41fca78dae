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
                           "--sizes", "tiny", "--batch", "2", "--prompt-len", "5", "--json"],
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
