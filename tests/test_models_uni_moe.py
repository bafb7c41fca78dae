"""Uni-MoE (hecate.models.uni_moe) and its three-stage schedule (hecate.train.stages): each stage
trains exactly its parameters (others unchanged, no optimizer state for them), modality-aware
expert groups restrict routing in the expert stage, LoRA experts start as a no-op, and under ep /
fssdp the MoE part is sharded and the staged run matches dp."""
import pytest
import torch

from hecate.data.multimodal import multimodal_batch
from hecate.models.registry import build_model, get_preset
from hecate.testing import run_distributed
from hecate.train.stages import StageConfig, load_stage_config, run_stages
from tests.uni_moe_cases import staged_case


def tiny(**kw):
    torch.manual_seed(0)
    p = get_preset("tiny-uni-moe")
    return build_model(p.arch, {**p.config, **kw})


def test_each_stage_trains_exactly_its_parameters():
    cfg = load_stage_config("configs/models/tiny-uni-moe.yaml")
    cfg.stages = [{"name": "align", "steps": 2}, {"name": "experts", "steps": 2}, {"name": "lora", "steps": 2}]
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def on_end(stage, m, engine):
        now = {n: p.detach().clone() for n, p in m.named_parameters()}
        changed = {n for n in now if not torch.equal(now[n], before[n])}
        stepped = {n for n, p in m.named_parameters() if p in engine.optimizer.state}
        want = set(m.stage_parameters(stage["name"]))
        assert changed == want, (stage["name"], sorted(changed ^ want))
        assert stepped == want  # optimizer state exists for the stage's parameters only
        before.update(now)
        seen.append(stage["name"])

    records = run_stages(cfg, model=model, on_stage_end=on_end)
    assert seen == ["align", "experts", "lora"]
    names = {r["name"]: r["trainable"] for r in records}
    assert all(n.startswith("connectors.") for n in names["align"]) and names["align"]
    assert all(".ffn.experts." in n or ".ffn.router." in n for n in names["experts"])
    assert any(".ffn.experts." in n for n in names["experts"]) and any(".ffn.router." in n for n in names["experts"])
    assert all(n.startswith("lora.") for n in names["lora"]) and names["lora"]


def test_modality_groups_restrict_routing_in_the_expert_stage():
    model = tiny(expert_groups={"image": [0, 1], "audio": [2, 3], "text": [0, 1]})
    (tokens, features), _ = multimodal_batch(0, 4)
    image_only = {"image": features["image"]}
    for stage, allowed in (("experts", {0, 1}), ("full", {0, 1, 2, 3})):
        model.set_stage(stage)
        out = model(tokens, image_only)
        used = {e for s in out.moe_stats for e in torch.nonzero(s.tokens_per_expert_E).flatten().tolist()}
        assert used <= allowed and (stage == "experts" or used - {0, 1}), (stage, used)
    model.set_stage("experts")
    out = model(tokens, {"audio": features["audio"]})  # audio frames -> {2, 3}, text -> {0, 1}
    used = {e for s in out.moe_stats for e in torch.nonzero(s.tokens_per_expert_E).flatten().tolist()}
    assert used == {0, 1, 2, 3}


def test_lora_experts_start_as_a_no_op_and_follow_the_routing():
    model = tiny()
    (tokens, features), _ = multimodal_batch(0, 2)
    ref = model(tokens, features).logits
    with torch.no_grad():
        for lora in model.lora:
            lora.B_EDR.normal_(std=0.2)
    moved = model(tokens, features).logits
    assert not torch.allclose(ref, moved)
    with torch.no_grad():
        for lora in model.lora:
            lora.B_EDR.zero_()
    torch.testing.assert_close(model(tokens, features).logits, ref)
    lora = model.lora[0]
    x = torch.randn(3, 32)
    idx, w = torch.tensor([[0, 2], [1, 3], [3, 0]]), torch.rand(3, 2)
    with torch.no_grad():
        lora.B_EDR.normal_()
    want = torch.stack([sum(w[t, k] * lora.scale * lora.B_EDR[idx[t, k]] @ (lora.A_ERD[idx[t, k]] @ x[t])
                            for k in range(2)) for t in range(3)])
    torch.testing.assert_close(lora(x, idx, w), want)


def test_config_errors():
    with pytest.raises(ValueError, match="expert_groups\\['video'\\]"):
        tiny(expert_groups={"video": [0, 1]})
    with pytest.raises(ValueError, match="fewer than top_k"):
        tiny(expert_groups={"image": [0]})
    with pytest.raises(ValueError, match="stages\\[0\\]"):
        load_stage_config("configs/models/tiny-uni-moe.yaml", {"stages": [{"name": "pretrain", "steps": 1}]})
    model = tiny()
    with pytest.raises(ValueError, match="features\\['image'\\] must be"):
        model(torch.zeros(1, 3, dtype=torch.long), {"image": torch.zeros(1, 4, 5)})


def test_strategies_shard_the_moe_part_and_match_dp():
    runs = {s: run_distributed(staged_case, 2, s, o, timeout=300)
            for s, o in (("dp", {}), ("ep", {}), ("fssdp", {"overlap_degree": 2, "fit_replicas": False}))}
    for s, results in runs.items():
        for r, ref in zip(results, runs["dp"]):  # rank r against dp's rank r (each reads its own slice)
            for got, want in zip(r["losses"], ref["losses"]):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-3)
            align, experts, lora = r["snaps"]
            for a, b in zip(align["experts"] + experts["experts"], ref["snaps"][0]["experts"] + ref["snaps"][1]["experts"]):
                for n in a:  # Adam turns reduction-order noise in near-zero gradients into lr-sized
                    # steps on a few elements; a wrong shard or a missing reduce moves all of them
                    diff = (a[n] - b[n]).abs()
                    assert diff.max() < 1e-2 and diff.mean() < 1e-4, (s, n, float(diff.max()), float(diff.mean()))
            for a, b in zip(experts["experts"], lora["experts"]):  # the lora stage leaves experts alone
                for n in a:
                    assert torch.equal(a[n], b[n]), (s, n)
        full = runs["dp"][0]["snaps"][0]["local_expert_numel"]
        local = results[0]["snaps"][0]["local_expert_numel"]
        assert local == (full if s == "dp" else full // 2), (s, local, full)  # ep / fssdp: half per rank
