"""`hecate convert --from-hf / --to-hf` and `hecate train --init`: a converted run directory
loads under every strategy with the logits transformers computes, and writes back unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from hecate.cli import main  # noqa: E402
from hecate.integrations.hf import from_hf  # noqa: E402
from hecate.testing import run_distributed  # noqa: E402
from hecate.train.config import load_config  # noqa: E402
from tests.hf_run_cases import IDS, init_case  # noqa: E402


def _qwen2_moe_dir(path, seed=0):
    cfg = transformers.Qwen2MoeConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, intermediate_size=40,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=20, mlp_only_layers=[0])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def test_convert_both_ways_and_init_under_every_strategy(tmp_path):
    src, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    hf_model = _qwen2_moe_dir(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(run)]) == 0
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert main(["convert", "--to-hf", str(run), "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for k, t in hf_model.state_dict().items():
        assert torch.equal(t, back.state_dict()[k]), k
    with torch.no_grad():
        want = hf_model(input_ids=IDS).logits
    for strategy in ("dp", "ep", "fsdp", "fssdp"):
        for logits in run_distributed(init_case, 2, str(run), strategy):
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_init_refuses_a_different_model(tmp_path):
    from hecate.train.init_weights import check_same_model

    src, run = tmp_path / "hf", tmp_path / "run"
    _qwen2_moe_dir(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(run)]) == 0
    cfg = load_config(f"{run}/config.yaml", ["model.norm_eps=1e-5", "model.moe.aux_loss_coeff=0.1"])
    from hecate.train.init_weights import saved_model_section

    with pytest.raises(ValueError, match="model.norm_eps"):
        check_same_model(cfg.model, saved_model_section(run), run)
    ok = load_config(f"{run}/config.yaml", ["model.moe.aux_loss_coeff=0.1"])  # a training knob may change
    check_same_model(ok.model, saved_model_section(run), run)
    assert main(["convert", "--from-hf", str(src), "--out", str(run)]) == 2  # never overwrites


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_trainer_starts_from_init_weights(tmp_path):
    from hecate.train.trainer import Trainer

    src, run = tmp_path / "hf", tmp_path / "run"
    _qwen2_moe_dir(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(run)]) == 0
    cfg = load_config(f"{run}/config.yaml", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=1",
                                               f"train.out_dir={tmp_path}/train", f"train.init={run}",
                                               "data.embedded_max_bytes=100000", f"data.cache_dir={tmp_path}/c",
                                               "logging.progress=false"])
    trainer = Trainer(cfg)
    try:
        want = from_hf(src).state_dict()
        got = trainer.model.state_dict()
        for k, t in want.items():
            assert torch.equal(got[k], t), k
    finally:
        trainer.close()
