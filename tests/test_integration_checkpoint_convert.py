"""DeepSpeed / Megatron checkpoint conversion on synthetic files with the libraries' exact naming
(no DeepSpeed or Megatron import: runs in CI; the real-library round trip is in
test_integration_deepspeed_checkpoint.py)."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hecate.integrations.convert_deepspeed import (CheckpointFormatError, deepspeed_to_hecate,
                                                   export_deepspeed_checkpoint, hecate_to_deepspeed,
                                                   import_deepspeed_checkpoint, load_deepspeed_checkpoint)
from hecate.integrations.convert_megatron import hecate_to_megatron, megatron_to_hecate
from hecate.integrations.deepspeed import MoE
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.train.checkpoint import import_safetensors

D, Fh, E = 8, 12, 4
P = "blocks.1.moe"


def ds_state(residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {"embed.weight": torch.randn(5, D, generator=g),
         f"{P}.deepspeed_moe.gate.wg.weight": torch.randn(E, D, generator=g)}
    for e in range(E):
        s[f"{P}.deepspeed_moe.experts.deepspeed_experts.{e}.0.weight"] = torch.randn(Fh, D, generator=g)
        s[f"{P}.deepspeed_moe.experts.deepspeed_experts.{e}.2.weight"] = torch.randn(D, Fh, generator=g)
    if residual:
        s[f"{P}.mlp.0.weight"] = torch.randn(Fh, D, generator=g)
        s[f"{P}.mlp.2.weight"] = torch.randn(D, Fh, generator=g)
        s[f"{P}.coefficient.weight"] = torch.randn(2, D, generator=g)
        s[f"{P}.coefficient.bias"] = torch.randn(2, generator=g)
    return s


def write_ds_checkpoint(root, state, tag="global_step3"):
    """DeepSpeed's on-disk layout: model states without experts, one file per expert, optim files."""
    path = os.path.join(root, tag)
    os.makedirs(path)
    experts = {k: v for k, v in state.items() if ".deepspeed_experts." in k}
    torch.save({"module": {k: v for k, v in state.items() if k not in experts}, "num_experts": [E]},
               os.path.join(path, "mp_rank_00_model_states.pt"))
    for e in range(E):
        torch.save({k: v for k, v in experts.items() if f".deepspeed_experts.{e}." in k},
                   os.path.join(path, f"layer_0_expert_{e}_mp_rank_00_model_states.pt"))
    for r in range(2):
        torch.save({"optimizer_state_dict": {}}, os.path.join(path, f"expp_rank_{r}_mp_rank_00_optim_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, D)
        self.blocks = nn.ModuleList([nn.Identity(), nn.Module()])
        ex = nn.Sequential(nn.Linear(D, Fh, bias=False), nn.GELU(), nn.Linear(Fh, D, bias=False))
        self.blocks[1].moe = MoE(D, ex, num_experts=E, k=2, use_residual=True, drop_tokens=False,
                                 top2_2nd_expert_sampling=False)


def test_deepspeed_names_round_trip():
    s = ds_state()
    h = deepspeed_to_hecate(s)
    assert h[f"{P}.moe.experts.w1_EFD"].shape == (E, Fh, D)
    assert torch.equal(h[f"{P}.moe.experts.w2_EDF"][3], s[f"{P}.deepspeed_moe.experts.deepspeed_experts.3.2.weight"])
    back = hecate_to_deepspeed(h)
    assert set(back) == set(s) and all(torch.equal(back[k], s[k]) for k in s)


def test_deepspeed_directory_into_a_model(tmp_path):
    s = ds_state()
    write_ds_checkpoint(tmp_path / "ckpt", s)
    info = import_deepspeed_checkpoint(tmp_path / "ckpt", tmp_path / "h.safetensors")
    assert len(info["expert_files"]) == E and len(info["optimizer_files"]) == 2
    model = UserModel()
    layer = model.blocks[1].moe.moe
    import_safetensors(tmp_path / "h.safetensors", model, layer.strategy)
    assert torch.equal(layer.experts.w1_EFD[2], s[f"{P}.deepspeed_moe.experts.deepspeed_experts.2.0.weight"])
    assert torch.equal(layer.router.weight_ED, s[f"{P}.deepspeed_moe.gate.wg.weight"])
    assert torch.equal(layer.residual.coefficient.bias, s[f"{P}.coefficient.bias"])
    # and back to DeepSpeed's layout
    from hecate.train.checkpoint import export_safetensors

    export_safetensors(tmp_path / "out.safetensors", model, layer.strategy)
    export_deepspeed_checkpoint(tmp_path / "out.safetensors", tmp_path / "back")
    again, info2 = load_deepspeed_checkpoint(tmp_path / "back")
    assert len(info2["expert_files"]) == E
    assert set(again) == set(s) and all(torch.equal(again[k], s[k]) for k in s)


def test_unsafe_pickle_is_refused(tmp_path):
    write_ds_checkpoint(tmp_path / "ckpt", ds_state())
    bad = tmp_path / "ckpt" / "global_step3" / "layer_0_expert_1_mp_rank_00_model_states.pt"
    torch.save({"x": nn.Linear(2, 2)}, bad)  # a module object: weights_only loading must refuse it
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        load_deepspeed_checkpoint(tmp_path / "ckpt")


def test_deepspeed_errors(tmp_path):
    s = ds_state(residual=False)
    del s[f"{P}.deepspeed_moe.experts.deepspeed_experts.3.0.weight"]
    del s[f"{P}.deepspeed_moe.experts.deepspeed_experts.3.2.weight"]
    with pytest.raises(CheckpointFormatError, match="expert files missing"):
        deepspeed_to_hecate(s)
    s = ds_state(residual=False)
    for e in range(E):
        s[f"{P}.deepspeed_moe.experts.deepspeed_experts.{e}.0.bias"] = torch.zeros(Fh)
    with pytest.raises(CheckpointFormatError, match="bias"):  # the built-in experts have no biases
        deepspeed_to_hecate(s, layout="grouped")
    # layout "auto": biased experts take the drop-in's ModuleExperts names (stacked per expert)
    assert deepspeed_to_hecate(s)[f"{P}.moe.experts.0__bias"].shape == (E, Fh)
    with pytest.raises(CheckpointFormatError, match="no DeepSpeed MoE layer"):
        deepspeed_to_hecate({"w": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="latest"):
        load_deepspeed_checkpoint(tmp_path)
    h = deepspeed_to_hecate(ds_state())
    h[f"{P}.moe.router.expert_bias_E"] += 1
    with pytest.raises(CheckpointFormatError, match="selection bias"):
        hecate_to_deepspeed(h)


# ---- Megatron ------------------------------------------------------------------------------------
MP = "decoder.layers.{}.mlp"


def megatron_experts(gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp = 2 * Fh if gated else Fh
    return [torch.randn(fp, D, generator=g) for _ in range(E)], [torch.randn(D, Fh, generator=g) for _ in range(E)]


def megatron_state(layout, gated, shared=True, layers=(1, 3)):
    s = {"embedding.word_embeddings.weight": torch.randn(5, D)}
    for n in layers:
        p = MP.format(n)
        fc1, fc2 = megatron_experts(gated, seed=n)
        s[p + ".router.weight"] = torch.randn(E, D)
        s[p + ".router.expert_bias"] = torch.randn(E)
        if layout == "sequential":
            for i in range(E):
                s[f"{p}.experts.local_experts.{i}.linear_fc1.weight"] = fc1[i]
                s[f"{p}.experts.local_experts.{i}.linear_fc2.weight"] = fc2[i]
        elif layout == "te_grouped":
            for i in range(E):
                s[f"{p}.experts.linear_fc1.weight{i}"] = fc1[i]
                s[f"{p}.experts.linear_fc2.weight{i}"] = fc2[i]
                s[f"{p}.experts.linear_fc1._extra_state"] = None
        else:  # GroupedMLP: weight1 viewed as [E, D, F'], weight2 as [E, F, D]
            s[f"{p}.experts.weight1"] = torch.stack([w.t() for w in fc1]).reshape(D, -1)
            s[f"{p}.experts.weight2"] = torch.stack([w.t() for w in fc2]).reshape(-1, D)
        if shared:
            s[p + ".shared_experts.linear_fc1.weight"] = torch.randn(2 * 6 if gated else 6, D)
            s[p + ".shared_experts.linear_fc2.weight"] = torch.randn(D, 6)
    return s, fc1, fc2


def megatron_expert_forward(x, fc1, fc2, gated):
    """Megatron's MLP: fc1 -> (glu: silu(first half) * second half | gelu) -> fc2."""
    h = x @ fc1.t()
    if gated:
        a, b = torch.chunk(h, 2, dim=-1)
        h = F.silu(a) * b
    else:
        h = F.gelu(h)
    return h @ fc2.t()


@pytest.mark.parametrize("layout", ["sequential", "te_grouped", "legacy_grouped"])
@pytest.mark.parametrize("gated", [False, True])
def test_megatron_round_trip_and_numerics(layout, gated):
    s, fc1, fc2 = megatron_state(layout, gated)
    h = megatron_to_hecate(s, gated=gated)
    p = MP.format(3)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=2,
                    activation="swiglu" if gated else "gelu", num_shared_experts=1, shared_expert_hidden_size=6)
    layer = MoELayer(cfg)
    own = {k[len(p) + 1:]: v for k, v in h.items() if k.startswith(p + ".")}
    layer.load_state_dict(own)  # strict: every Hecate tensor of the layer is produced
    x = torch.randn(7, D)
    for e in range(E):
        assert torch.allclose(layer.experts.expert_forward(e, x), megatron_expert_forward(x, fc1[e], fc2[e], gated),
                              atol=1e-5)
    back = hecate_to_megatron(h, layout=layout)
    want = {k: v for k, v in s.items() if not k.endswith("_extra_state")}
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want), layout


def test_megatron_to_hecate_transformer_names():
    from hecate.models.transformer import MoETransformer, TransformerConfig

    s, _, _ = megatron_state("sequential", gated=False, shared=False, layers=(1,))
    h = megatron_to_hecate(s, hecate_prefix="blocks.{layer}.ffn")
    moe = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=2)
    model = MoETransformer(TransformerConfig(vocab_size=5, d_model=D, n_layers=2, n_heads=2, moe_every=2, moe=moe))
    ffn_keys = {k for k in model.state_dict() if k.startswith("blocks.1.ffn.")}
    assert ffn_keys <= set(h)
    back = hecate_to_megatron(h, hecate_prefix="blocks.{layer}.ffn")
    assert all(torch.equal(back[k], s[k]) for k in s)


def test_megatron_errors():
    s, _, _ = megatron_state("sequential", gated=False)
    with pytest.raises(CheckpointFormatError, match="wrong `gated`"):
        megatron_to_hecate(s, gated=True)  # fc1 rows split in half no longer form the MLP
    s2 = {k: v for k, v in s.items() if "local_experts.2." not in k}
    with pytest.raises(CheckpointFormatError, match="no expert weights"):
        megatron_to_hecate(s2)
    s3 = dict(s, **{MP.format(1) + ".experts.local_experts.0.linear_fc1.bias": torch.zeros(Fh)})
    with pytest.raises(CheckpointFormatError, match="expert biases must be present for every expert"):
        megatron_to_hecate(s3)  # a bias on one expert only
    with pytest.raises(CheckpointFormatError, match="no Megatron MoE router"):
        megatron_to_hecate({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="layout="):
        hecate_to_megatron(megatron_to_hecate(s), layout="fused")
