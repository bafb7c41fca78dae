"""Every preset named after a paper model counts, through `hecate inspect --json` (meta device),
what the paper reports, within the paper's rounding (hecate.models.paper_sizes)."""
import json

import pytest

from hecate.cli import main
from hecate.models.paper_sizes import DERIVED, PAPER_SIZES, derived_total, ours, within_rounding
from hecate.models.registry import build_model, get_preset

_INSPECTED: dict = {}


def _inspect(preset, capsys):
    if preset not in _INSPECTED:
        assert main(["inspect", preset, "--json"]) == 0
        _INSPECTED[preset] = json.loads(capsys.readouterr().out)
    return _INSPECTED[preset]


@pytest.mark.parametrize("entry", PAPER_SIZES, ids=lambda e: f"{e.preset}-{e.quantity}")
def test_preset_matches_the_paper(entry, capsys):
    if entry.quantity in DERIVED:
        got = derived_total(entry.preset, entry.quantity)
    else:
        got = ours(entry.preset, entry.quantity, _inspect(entry.preset, capsys))
    assert within_rounding(entry.reported, got), (
        f"{entry.preset} {entry.quantity}: ours {got:,} does not round to the paper's {entry.reported} "
        f"({entry.source})")


def test_rounding_rule():
    assert within_rounding("1.84B", 1_844_999_999) and not within_rounding("1.84B", 1_845_000_001)
    assert within_rounding("13B", 12_500_000_000) and not within_rounding("13B", 13_600_000_000)
    assert within_rounding("776,002,560", 776_002_560) and not within_rounding("776,002,560", 776_002_561)
    with pytest.raises(ValueError, match="1.84B"):
        within_rounding("about 2B", 2)


def test_old_layouts_would_fail():
    # The previous presets (MoE every other layer; BAM's FFN dimension as the SwiGLU width) did not match.
    assert not within_rounding("1.84B", 988_134_912)
    assert not within_rounding("776,002,560", 926_997_504)


# DiT's model table (depth, width, heads); Switch-DiT adds to every block a switch of 3 linear
# experts D -> D with bias (top-2, gated by the timestep; the authors' ParallelExperts w, b), their
# router (Linear(D, 3) with bias, the authors' f_gate) and the shared expert D x D.
DIT = {"switch-dit-s2": (12, 384, 6), "switch-dit-b2": (12, 768, 12), "switch-dit-l2": (24, 1024, 16),
       "switch-dit-xl2": (28, 1152, 16)}


@pytest.mark.parametrize("preset", sorted(DIT))
def test_switch_dit_presets_have_the_papers_layout(preset, capsys):
    c = get_preset(preset).config
    depth, width, heads = DIT[preset]
    assert (c["n_layers"], c["d_model"], c["n_heads"], c["patch_size"]) == (depth, width, heads, 2)
    assert (c["num_experts"], c["top_k"], c.get("expert_type", "linear"), c.get("expert_bias", True)) \
        == (3, 2, "linear", True)
    info = _inspect(preset, capsys)
    assert info["routed_expert_params"] == depth * 3 * (width * width + width)
    switch = info["total_params"] - derived_total(preset, "backbone_total")
    assert switch == depth * (3 * (width * width + width) + width * width + 3 * width + 3)
    # active: top-2 of the 3 routed experts per block
    assert info["total_params"] - info["active_params"] == depth * (width * width + width)


@pytest.mark.parametrize("preset", ["mixture-of-mamba-790m", "mixture-of-mamba-1.4b"])
def test_mixture_of_mamba_presets_have_the_authors_block(preset):
    """The authors' block (their MixtureOfMamba.py defaults): d_state 16, d_conv 4, expand 2,
    dt_rank ceil(d / 16), all four projections (in, x, dt, out) modality-specific for 2
    modalities, in + out projections 3 * expand * d_model^2 per modality; conv, A and D shared."""
    p = get_preset(preset)
    c = p.config
    assert (c["d_state"], c["d_conv"], c["expand"], c["num_modalities"]) == (16, 4, 2, 2)
    model = build_model(p.arch, c, "meta")
    mixer = model.blocks[0].mixer
    d = c["d_model"]
    assert sorted(mixer.cfg.decoupled) == ["dt", "in", "out", "x"]
    assert mixer.in_proj_MXD.shape[0] == mixer.x_proj_MPE.shape[0] == mixer.dt_proj_MER.shape[0] \
        == mixer.out_proj_MDE.shape[0] == 2
    assert (mixer.in_proj_MXD[0].numel() + mixer.out_proj_MDE[0].numel()) == 3 * c["expand"] * d * d
    assert mixer.A_log_EN.shape == (c["expand"] * d, 16) and mixer.conv.weight.shape == (c["expand"] * d, 1, 4)
    dt_rank = -(-d // 16)  # the authors' dt_rank="auto": ceil(d_model / 16)
    assert mixer.dt_proj_MER.shape[-1] == dt_rank and mixer.x_proj_MPE.shape[1] == dt_rank + 2 * 16


@pytest.mark.parametrize("preset,vanilla_reported", [("mohd-355m", "355M"), ("mohd-495m", "495M"),
                                                     ("mohd-1.13b", "1.13B")])
def test_mohd_preset_totals(preset, vanilla_reported, capsys):
    """The paper's vanilla model plus, per layer, the router (d x routed groups) and the fusion
    blocks (N w x w); a token skips the W1/W3 columns, W2 rows and fusion block of every group it
    does not use (N - shared - top_k of N). All on the meta device."""
    c = get_preset(preset).config
    L, d, F = c["n_layers"], c["d_model"], c["dense_ffn_hidden"]
    N, S, K = c["mohd_sub_dims"], c["mohd_shared"], c["mohd_top_k"]
    w = F // N
    assert (N, S + K) == (16, 8)  # half the FFN's units per token (the paper's 50% setting)
    assert (c["vocab_size"], c["dense_activation"], c["rope"], c["tie_embeddings"]) == (32000, "swiglu", True, False)
    vanilla = derived_total(preset, "vanilla_total")
    # LLaMA layout with MoHD off: untied embedding and head, per layer q/k/v/o d x d, SwiGLU 3 d F, 2 RMSNorms
    assert vanilla == 2 * c["vocab_size"] * d + d + L * (4 * d * d + 3 * d * F + 2 * d)
    info = _inspect(preset, capsys)
    assert info["total_params"] == vanilla + L * (d * (N - S) + N * w * w)
    assert info["total_params"] - info["active_params"] == L * (N - S - K) * (3 * d * w + w * w)
    assert within_rounding(vanilla_reported, vanilla)
