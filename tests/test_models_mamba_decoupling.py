"""Mixture-of-Mamba's per-projection decoupling switches (MambaConfig.decoupled, the paper's
ablation): a decoupled projection has one weight set per modality, the others are shared."""
import pytest
import torch

from hecate.models.registry import build_model, count_parameters, get_preset


def tiny(**kw):
    torch.manual_seed(0)
    p = get_preset("tiny-mixture-of-mamba")
    return build_model(p.arch, dict(p.config, moe_every=0, **kw))


@pytest.mark.parametrize("decoupled", [["in"], ["x", "dt"], ["out"], []])
def test_only_decoupled_projections_are_per_modality(decoupled):
    model = tiny(decoupled=decoupled)
    mixer = model.blocks[0].mixer
    shapes = {"in": mixer.in_proj_MXD, "x": mixer.x_proj_MPE, "dt": mixer.dt_proj_MER, "out": mixer.out_proj_MDE}
    for name, w in shapes.items():
        assert w.shape[0] == (2 if name in decoupled else 1), name
    assert mixer.dt_bias_ME.shape[0] == (2 if "dt" in decoupled else 1)
    # A text-only batch: decoupled projections get no gradient on the image slice; shared ones do.
    tokens = torch.randint(0, 32, (2, 12))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    for name, w in shapes.items():
        if name in decoupled:
            assert w.grad[1].abs().sum() == 0 and w.grad[0].abs().sum() > 0, name
        else:
            assert w.grad[0].abs().sum() > 0, name


def test_counts_follow_the_switches():
    full, only_in = tiny(), tiny(decoupled=["in"])
    m = full.blocks[0].mixer
    per_modality_rest = sum(getattr(m, n)[0].numel() for n in ("x_proj_MPE", "dt_proj_MER", "dt_bias_ME", "out_proj_MDE"))
    c_full, c_in = count_parameters(full), count_parameters(only_in)
    assert c_full["total_params"] - c_in["total_params"] == 2 * per_modality_rest  # 2 layers, 1 extra copy each
    assert c_full["active_params"] == c_in["active_params"]  # a token uses one copy either way


def test_bad_switch_names_the_key():
    with pytest.raises(ValueError, match="decoupled=\\['conv'\\]"):
        tiny(decoupled=["conv"])
