"""SCMoE self-contrast decoding: beta = 0 is greedy, the plausibility cut keeps only tokens within
alpha of the best, the weak pass routes as specified; `hecate generate/eval` reach it from the CLI."""
import math

import pytest
import torch

from hecate.cli import main
from hecate.inference.kv_cache import CachedDecoder
from hecate.inference.sampling import generate
from hecate.inference.scmoe import SCMoE, contrast, parse_scmoe
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe.overrides import routing_overrides

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]


def model_of():
    torch.manual_seed(1)
    model = MoETransformer(TransformerConfig(n_layers=2, moe_every=1, max_seq_len=32)).eval()
    with torch.no_grad():  # sharper routers: the rank-2 pass differs clearly from top-2
        for layer in model.moe_layers():
            layer.router.weight_ED.mul_(8)
    return model


def test_beta_zero_is_greedy_and_beta_changes_tokens():
    model = model_of()
    greedy = generate(model, PROMPTS, 10)
    assert generate(model, PROMPTS, 10, scmoe=SCMoE(0.0, 0.1)) == greedy
    # alpha = 1 keeps only the strong argmax, whatever beta
    assert generate(model, PROMPTS, 10, scmoe=SCMoE(5.0, 1.0)) == greedy
    assert generate(model, PROMPTS, 10, scmoe=SCMoE(5.0, 1e-9)) != greedy


def test_plausibility_cut():
    strong = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    weak = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    out = contrast(strong, weak, beta=1.0, alpha=0.25)
    # p >= 0.25 * 0.5 keeps tokens 0, 1, 2; token 3 (0.05) is cut
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()
    expect = 2 * strong[0, :3] - weak[0, :3]
    torch.testing.assert_close(out[0, :3], expect)
    assert out.argmax().item() == 1  # the contrast prefers what the weak pass does not
    assert torch.isfinite(contrast(strong, weak, 1.0, 0.05)).all()


def test_weak_pass_routes_rank_k():
    model = model_of()
    weak = SCMoE(1.0, 0.1).weak_overrides(model)
    assert weak == {"ranks": {0: [2], 1: [2]}}
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(m.router.override)) for layer in model.moe_layers()]
    try:
        CachedDecoder(model, PROMPTS, [weak]).logits()
    finally:
        for h in hooks:
            h.remove()
    assert [o.ranks for o in seen] == [(2,), (2,)]
    # rank-2 logits equal the model under routing_overrides(ranks=[2])
    with routing_overrides(model, ranks=[2]):
        ref = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(CachedDecoder(model, PROMPTS[:1], [weak]).logits()[0], ref, rtol=1e-4, atol=1e-4)
    assert parse_scmoe("0.5,0.1,weak=top1").weak == {"top_k": 1}
    assert parse_scmoe("0.5,0.1,weak=rank3").weak == {"ranks": [3]}
    with pytest.raises(ValueError, match="weak=rankK"):
        parse_scmoe("0.5,0.1,weak=last")
    with pytest.raises(ValueError, match="alpha"):
        parse_scmoe("0.5,0")


def test_cli_generate_and_eval_with_routing_and_scmoe(tmp_path, capsys):
    from tests.test_cli_generate import _make_run

    _make_run(tmp_path)
    args = ["generate", str(tmp_path), "--prompt", "def f", "--prompt", "x", "--tokens", "6", "--temperature", "0"]
    assert main(args + ["--scmoe", "0.5,0.1", "--routing", "disable=0,top_k=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "def f" in out
    assert main(["eval", str(tmp_path), "--batches", "1", "--json"]) == 0
    import json

    base = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path), "--batches", "1", "--json", "--routing", "disable=1,disable=2"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert math.isfinite(base["val_loss"]) and masked["val_loss"] != base["val_loss"]
    assert main(["eval", str(tmp_path), "--routing", "mask=nope"]) == 2
    assert "masks: none" in capsys.readouterr().err


def test_weak_default_for_top1_layers_and_switch_router_error():
    from hecate.moe import MoEConfig

    torch.manual_seed(0)
    top1 = MoETransformer(TransformerConfig(n_layers=1, moe_every=1, moe=MoEConfig(
        hidden_size=64, ffn_hidden_size=64, num_experts=4, top_k=1))).eval()
    assert SCMoE(1.0, 0.1).weak_overrides(top1) == {"ranks": {0: [2]}}
    switch = MoETransformer(TransformerConfig(n_layers=1, moe_every=1, moe=MoEConfig(
        hidden_size=64, ffn_hidden_size=64, num_experts=4, top_k=1, router="switch"))).eval()
    with pytest.raises(ValueError, match="switch router ranks one expert"):
        generate(switch, PROMPTS, 2, scmoe=SCMoE(1.0, 0.1))
