"""The language-model zoo: every preset builds on the meta device with the right parameter
counts, the tiny presets train under dp, ep and fssdp at W = 2 like one process, and the
configs/models YAMLs are the tiny presets."""
from pathlib import Path

import pytest
import torch

from hecate.models.registry import PRESETS, build_model, count_parameters, get_preset, make_config
from hecate.testing import run_distributed
from hecate.train.config import load_config
from tests.zoo_cases import train_case

TINY = ["tiny-gpt-moe", "tiny-prmoe", "tiny-deepseek", "tiny-moh", "tiny-bam", "tiny-bam-shared-kv"]


def _lm_presets():
    get_preset("tiny-moh")  # importing the zoo registers every preset
    return sorted(n for n, p in PRESETS.items() if p.arch == "transformer")


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("strategy", ["dp", "ep", "fssdp"])
def test_tiny_preset_trains_like_single_process(preset, strategy):
    results = run_distributed(train_case, 2, preset, strategy, 4)
    for r in results:
        losses, ref = torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])
        assert losses[2:].mean() < losses[:2].mean() - 0.3, f"loss did not fall: {losses.tolist()}"
        # Adam turns reduction-order noise in near-zero gradients into lr-sized steps on a few
        # elements, so losses drift by ~1e-4 per step; a missing all-reduce or a wrong shard
        # moves every parameter by ~lr (3e-3) and the loss by much more.
        torch.testing.assert_close(losses, ref, rtol=0, atol=2e-3)
        dense, ref_dense = r["dense"]
        assert set(dense) == set(ref_dense) and dense
        for n in dense:
            torch.testing.assert_close(dense[n], ref_dense[n], rtol=1e-3, atol=3e-4, msg=lambda m: f"{n}: {m}")
        for got, want in zip(*r["experts"]):
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=3e-4, msg=lambda m: f"{n}: {m}")


def test_every_lm_preset_builds_on_meta_and_counts_parameters():
    names = _lm_presets()
    for want in ("gpt-moe-s", "gpt-moe-l", "ds-350m-moe-128", "ds-350m-prmoe-32-64", "ds-1.3b-prmoe-64-128",
                 "deepseekmoe-2b", "deepseekmoe-16b", "moh-llm-s", "moh-llm-b", "moh-llama3-8b",
                 "bam-small", "bam-large", "mohd-355m", "mohd-495m", "mohd-1.13b", *TINY):
        assert want in names
    for name in names:
        p = get_preset(name)
        model = build_model(p.arch, p.config, device="meta")
        c = count_parameters(model)
        assert 0 < c["active_params"] <= c["total_params"], name
        assert all(t.is_meta for t in model.parameters())


def _counts(name):
    p = get_preset(name)
    c = count_parameters(build_model(p.arch, p.config, device="meta"))
    return {k: c[k] for k in ("total_params", "active_params")}


def test_tiny_counts_by_hand():
    # tiny-gpt-moe: embed 256*32 + pos 32*32; per block 2 norms (64), qkv 96*32, out 32*32,
    # router 4*32, experts 4 * (2 * 64*32); final norm 32; tied head. Active: 2 of 4 experts.
    block = 64 + 96 * 32 + 32 * 32 + 4 * 32 + 4 * 2 * 64 * 32
    total = 256 * 32 + 32 * 32 + 2 * block + 32
    assert _counts("tiny-gpt-moe") == {"total_params": total, "active_params": total - 2 * (2 * 2 * 64 * 32)}
    # tiny-moh: GQA qkv (4 + 2*2) heads * 8 = 64 rows, out 32*32, MoH routers 3*32 + 1*32 + 2*32;
    # layer 0 dense SwiGLU 3*32*48, layer 1 MoE (router 4*32, 4 GeLU experts 2*48*32); RoPE (no pos).
    attn = 64 * 32 + 32 * 32 + (3 + 1 + 2) * 32
    total = 256 * 32 + 2 * (64 + attn) + 3 * 32 * 48 + 4 * 32 + 4 * 2 * 48 * 32 + 32
    skipped_heads = 2 * 2 * (3 - 2) * 8 * 32   # per layer: q rows + out columns of 1 skipped head
    assert _counts("tiny-moh") == {"total_params": total,
                                   "active_params": total - skipped_heads - 2 * 2 * 48 * 32}
    # tiny-prmoe: residual MoE keeps its dense MLP and coefficient (Linear(32, 2) + bias) active
    c = _counts("tiny-prmoe")
    experts = [2 * 2 * 48 * 32, 4 * 2 * 48 * 32]
    assert c["total_params"] - c["active_params"] == sum(e - e // n for e, n in zip(experts, (2, 4)))


@pytest.mark.parametrize("name,total,active", [
    ("deepseekmoe-16b", 16.4e9, 2.8e9),      # DeepSeekMoE paper: 16.4B total, 2.8B activated
    ("deepseekmoe-2b", 2.0e9, 0.3e9),
    ("ds-350m-moe-128", 13e9, 0.35e9),       # DeepSpeed-MoE: 350M+MoE-128 is 13B
    ("ds-350m-prmoe-32-64", 4e9, 0.45e9),    # 4B
    ("ds-1.3b-prmoe-64-128", 31e9, 1.7e9),   # 31B
    ("moh-llama3-8b", 8.03e9, 7.76e9),
])
def test_paper_presets_match_reported_sizes(name, total, active):
    c = _counts(name)
    assert abs(c["total_params"] - total) / total < 0.04, c
    assert abs(c["active_params"] - active) / active < 0.08, c


@pytest.mark.parametrize("preset", TINY)
def test_yaml_config_is_the_tiny_preset(preset):
    path = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{preset}.yaml"
    cfg = load_config(str(path), world_size=2)
    p = get_preset(preset)
    assert cfg.model == make_config(p.arch, p.config)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_zoo_params_script_lists_every_lm_preset():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_params.py"
    spec = importlib.util.spec_from_file_location("zoo_params", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.table()
    for name in _lm_presets():
        assert f"| `{name}` |" in text
    assert "| `tiny-gpt-moe` | 50,592 (50,592) | 34,208 (34,208) |" in text
