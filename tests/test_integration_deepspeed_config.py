"""DeepSpeed config translation and drop-in argument checks: no DeepSpeed import (runs in CI)."""
import pytest
import torch
from torch import nn

from hecate.integrations.deepspeed import MoE, deepspeed_moe_config
from hecate.integrations.deepspeed_config import deepspeed_to_train_config, translate_deepspeed_config
from hecate.integrations.expert_module import expert_mlp_weights

BASE = {"optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.99], "eps": 1e-7,
                                                  "weight_decay": 0.05}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": 200, "warmup_num_steps": 20, "cos_min_ratio": 0.1,
                                 "warmup_type": "linear"}},
        "bf16": {"enabled": True}, "gradient_clipping": 1.5,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}


def test_full_translation():
    sections, notes = translate_deepspeed_config(BASE, world_size=2)
    o, d, t = sections["optim"], sections["data"], sections["train"]
    assert d["batch_size"] == 4 and o["grad_accum"] == 4
    assert o["lr"] == 2e-3 and o["betas"] == [0.9, 0.99] and o["eps"] == 1e-7 and o["weight_decay"] == 0.05
    assert o["warmup_steps"] == 20 and o["min_lr"] == pytest.approx(2e-4) and t["steps"] == 200
    assert t["bf16"] is True and o["max_grad_norm"] == 1.5
    assert any("stage=2" in n for n in notes) and any("overlap_comm" in n for n in notes)
    assert sections["parallel"] == {"dense_optimizer": "sharded"}  # ZeRO 1/2: sharded optimizer state
    cfg = deepspeed_to_train_config(BASE, 2, base={"parallel": {"strategy": "fssdp"}})
    assert cfg.optim.grad_accum == 4 and cfg.data.batch_size == 4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.parallel.strategy == "fssdp" and cfg.parallel.dense_optimizer == "sharded"
    zero0 = dict(BASE, zero_optimization={"stage": 0})
    assert translate_deepspeed_config(zero0, 2)[0]["parallel"] == {"dense_optimizer": "replicated"}


@pytest.mark.parametrize("keys,expect", [
    ({"train_batch_size": 16}, (8, 1)),
    ({"train_micro_batch_size_per_gpu": 3}, (3, 1)),
    ({"train_batch_size": 24, "gradient_accumulation_steps": 3}, (4, 3)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 6}, (2, 6)),
])
def test_batch_keys(keys, expect):
    s, _ = translate_deepspeed_config(keys, world_size=2)
    assert (s["data"]["batch_size"], s["optim"]["grad_accum"]) == expect


def test_schedulers():
    s, _ = translate_deepspeed_config({"train_batch_size": 2, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_max_lr": 1e-3, "warmup_num_steps": 7, "warmup_type": "linear"}}}, 1)
    assert s["optim"]["lr"] == s["optim"]["min_lr"] == 1e-3 and s["optim"]["warmup_steps"] == 7
    s, _ = translate_deepspeed_config({"train_batch_size": 2}, 1)  # no scheduler: constant lr
    assert s["optim"]["warmup_steps"] == 0 and s["optim"]["min_lr"] == s["optim"]["lr"]
    s, _ = translate_deepspeed_config({"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {
        "lr": 5e-4, "weight_decay": 0.1}}}, 1)  # DeepSpeed's Adam is AdamW by default
    assert s["optim"]["weight_decay"] == 0.1


def test_every_problem_in_one_error():
    bad = {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "Lamb", "params": {}}, "fp16": {"enabled": True},
           "scheduler": {"type": "WarmupDecayLR", "params": {}},
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
           "pipeline": {}}
    with pytest.raises(ValueError) as e:
        translate_deepspeed_config(bad, world_size=2)
    msg = str(e.value)
    for key in ("train_batch_size=30", "optimizer.type='Lamb'", "fp16.enabled", "WarmupDecayLR",
                "zero_optimization.stage=3", "offload_optimizer", "pipeline"):
        assert key in msg, key


@pytest.mark.parametrize("cfg,key", [
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3},
     "train_batch_size=8 must equal"),
    ({"train_batch_size": 0}, "train_batch_size: must be a positive"),
    ({}, "set at least one"),
    ({"train_batch_size": 2, "scheduler": {"type": "WarmupLR", "params": {}}}, "warmup_type='log'"),
    ({"train_batch_size": 2, "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_type": "linear"}}},
     "total_num_steps: required"),
    ({"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"adam_w_mode": False,
                                                                      "weight_decay": 0.1}}}, "adam_w_mode"),
    ({"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "amsgrad"),
    ({"train_batch_size": 2, "gradient_clipping": -1}, "gradient_clipping"),
])
def test_errors_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace("[", r"\[")):
        translate_deepspeed_config(cfg, world_size=2)


def test_bad_world_and_type():
    with pytest.raises(ValueError, match="world_size"):
        translate_deepspeed_config({"train_batch_size": 2}, 0)
    with pytest.raises(TypeError, match="ds_config"):
        translate_deepspeed_config(3, 1)


def test_json_path(tmp_path):
    import json

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0}))
    s, _ = translate_deepspeed_config(str(p), 1)
    assert s["optim"]["max_grad_norm"] is None


# ---- drop-in MoE arguments (no DeepSpeed needed) ------------------------------------------------
def _expert(act=None, bias=False, d=8, f=12):
    return nn.Sequential(nn.Linear(d, f, bias=bias), act or nn.GELU(), nn.Linear(f, d, bias=bias))


@pytest.mark.parametrize("kwargs,key", [
    ({"k": 1, "use_rts": 1}, "use_rts must be a bool"),
    ({"enable_expert_tensor_parallelism": True}, "enable_expert_tensor_parallelism"),
    ({"noisy_gate_policy": "Gauss", "use_rts": False}, "noisy_gate_policy"),
    ({"ep_size": 3, "use_rts": False}, "ep_size=3"),
    ({"k": 9, "use_rts": False, "top2_2nd_expert_sampling": False}, "k=9"),
    ({"capacity_factor": 0, "use_rts": False}, "capacity_factor"),
    ({"min_capacity": -1, "use_rts": False}, "min_capacity"),
])
def test_unsupported_arguments_raise(kwargs, key):
    args = dict(num_experts=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=key):
        deepspeed_moe_config(8, 12, **args)


def test_deepspeed_defaults_and_random_options_are_accepted():
    # DeepSpeed's defaults (use_rts=True, top2_2nd_expert_sampling=True) and RSample / Jitter
    # are reproduced (tests/test_integration_deepspeed_experts.py checks the draws)
    for k in (1, 2, 3):
        deepspeed_moe_config(8, 12, num_experts=4, k=k)
        deepspeed_moe_config(8, 12, num_experts=4, k=k, noisy_gate_policy="RSample")
        deepspeed_moe_config(8, 12, num_experts=4, k=k, noisy_gate_policy="Jitter")
    deepspeed_moe_config(8, 12, num_experts=4, k=1, drop_tokens=False, use_rts=True)
    deepspeed_moe_config(8, 12, num_experts=4, k=3, noisy_gate_policy="RSample")
    cfg = deepspeed_moe_config(8, 12, num_experts=4, k=3, drop_tokens=True, capacity_factor=1.5)
    assert cfg.drop_policy == "probability" and cfg.capacity_factor == 1.5 and not cfg.renormalize
    assert deepspeed_moe_config(8, 12, num_experts=4, k=2, drop_tokens=False,
                                top2_2nd_expert_sampling=False).capacity_factor is None


@pytest.mark.parametrize("expert,key", [
    (_expert(nn.ReLU()), "ReLU"),
    (_expert(nn.SiLU()), "SiLU"),
    (_expert(nn.GELU(approximate="tanh")), "approximate='tanh'"),
    (_expert(bias=True), "bias-free"),
    (nn.Sequential(nn.Linear(8, 12, bias=False), nn.GELU(), nn.Dropout(0.1), nn.Linear(12, 8, bias=False)),
     "Dropout"),
    (nn.Linear(8, 8, bias=False), "exactly two"),
    (_expert(d=6), "hidden_size=8"),
])
def test_expert_forms_rejected(expert, key):
    with pytest.raises(ValueError, match=key):
        expert_mlp_weights(expert, 8)


class TwoLinear(nn.Module):
    def __init__(self, relu=False):
        super().__init__()
        self.up, self.down, self.relu = nn.Linear(8, 12, bias=False), nn.Linear(12, 8, bias=False), relu

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.relu(h) if self.relu else torch.nn.functional.gelu(h))


def test_custom_module_checked_numerically():
    w1, w2, act = expert_mlp_weights(TwoLinear(), 8)
    assert act == "gelu" and w1.shape == (12, 8) and w2.shape == (8, 12)
    with pytest.raises(ValueError, match="does not compute gelu"):
        expert_mlp_weights(TwoLinear(relu=True), 8)
    with pytest.raises(TypeError, match="expert must be an nn.Module"):
        expert_mlp_weights("mlp", 8)


def test_single_process_layer_without_deepspeed():
    torch.manual_seed(0)
    ex = _expert()
    moe = MoE(8, ex, num_experts=4, k=2, top2_2nd_expert_sampling=False, drop_tokens=False, use_residual=True)
    assert moe.strategy.name == "local"
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, l_aux, counts = moe(x)
    assert y.shape == x.shape and counts.sum() == 30 and l_aux.dim() == 0
    # every expert starts as a copy of `expert` (DeepSpeed's deep copy)
    assert torch.equal(moe.moe.experts.w1_EFD[3], ex[0].weight)
    (y.sum() + l_aux).backward()
    assert x.grad is not None and moe.moe.router.weight_ED.grad is not None
    with pytest.raises(ValueError, match="used_token"):
        moe(x, used_token=torch.ones(15))
    with pytest.raises(ValueError, match="hidden_size=8"):
        moe(torch.randn(4, 7))
    with pytest.raises(ValueError, match="strategy='ep' needs"):
        MoE(8, ex, num_experts=4, use_rts=False, strategy="ep")


def test_top1_drop_keeps_earliest_tokens():
    """Hecate keeps the first tokens of an over-full expert (DeepSpeed's top-1 picks any of them)."""
    torch.manual_seed(0)
    moe = MoE(8, _expert(), num_experts=2, k=1, capacity_factor=1.0, min_capacity=0, use_rts=False)
    with torch.no_grad():
        moe.moe.router.weight_ED.zero_()
        moe.moe.router.weight_ED[0, 0] = 10.0  # every token with x[:, 0] > 0 goes to expert 0
    x = torch.randn(10, 8)
    x[:, 0] = 1.0
    y, _, counts = moe(x)
    assert counts.tolist() == [10, 0]
    cap = 5  # ceil(1.0 * 10 / 2)
    assert (y[:cap].abs().sum(-1) > 0).all() and (y[cap:].abs().sum(-1) == 0).all()


def test_jitter_noises_the_router_input_in_training_only():
    torch.manual_seed(0)
    ex = _expert()
    plain = MoE(8, ex, num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False)
    jit = MoE(8, ex, num_experts=4, k=2, drop_tokens=False, top2_2nd_expert_sampling=False,
              noisy_gate_policy="Jitter")
    jit.load_state_dict(plain.state_dict())
    x = torch.randn(32, 8)
    plain.eval()
    jit.eval()
    assert torch.equal(plain(x)[0], jit(x)[0])  # eval: no noise
    jit.train()
    plain.train()
    a, b = jit(x)[0], plain(x)[0]
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # multiplicative noise of 1%: a small change


@pytest.mark.parametrize("stage", [0, 3])
def test_initialize_refuses_zero_stage_0_and_3(stage):
    from hecate.integrations.deepspeed import initialize

    with pytest.raises(ValueError, match=f"zero_optimization.stage={stage}"):
        initialize(nn.Linear(2, 2), {"train_batch_size": 2, "zero_optimization": {"stage": stage}},
                   torch.optim.AdamW)
