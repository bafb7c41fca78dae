"""Every preset named after a paper model counts, through `hecate inspect --json` (meta device),
what the paper reports, within the paper's rounding (hecate.models.paper_sizes)."""
import json

import pytest

from hecate.cli import main
from hecate.models.paper_sizes import PAPER_SIZES, dense_seed_config, ours, within_rounding
from hecate.models.registry import build_model, count_parameters, get_preset

_INSPECTED: dict = {}


def _inspect(preset, capsys):
    if preset not in _INSPECTED:
        assert main(["inspect", preset, "--json"]) == 0
        _INSPECTED[preset] = json.loads(capsys.readouterr().out)
    return _INSPECTED[preset]


@pytest.mark.parametrize("entry", PAPER_SIZES, ids=lambda e: f"{e.preset}-{e.quantity}")
def test_preset_matches_the_paper(entry, capsys):
    if entry.quantity == "seed_total":
        p = get_preset(entry.preset)
        got = count_parameters(build_model(p.arch, dense_seed_config(p.config), "meta"))["total_params"]
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
