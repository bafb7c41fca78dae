"""`model.arch` and `model.preset` in a TrainConfig: a zoo preset as the model's base config."""
import pytest

from hecate.models import registry
from hecate.train.config import from_dict

BASE = {"vocab_size": 300, "d_model": 48, "n_layers": 3, "n_heads": 4, "max_seq_len": 64,
        "dense_ffn_hidden": 64, "moe": {"hidden_size": 48, "num_experts": 8, "ffn_hidden_size": 32, "top_k": 2}}


@pytest.fixture
def preset():
    registry._load_zoo()
    registry.register_preset("test-config-base", "transformer", BASE)
    yield "test-config-base"
    registry.PRESETS.pop("test-config-base", None)


def test_preset_is_the_base_and_file_keys_override(preset):
    cfg = from_dict({"model": {"preset": preset, "n_layers": 2, "moe": {"top_k": 1}}}).validate()
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers) == (300, 48, 2)
    assert (m.moe.num_experts, m.moe.ffn_hidden_size, m.moe.top_k) == (8, 32, 1)
    assert "preset" not in cfg.to_dict()["model"]  # the saved config is the effective one
    assert from_dict({"model": {"arch": "transformer", "d_model": 16}}).model.moe.hidden_size == 16


@pytest.mark.parametrize("model,error,match", [
    ({"arch": "no_such_arch"}, ValueError, r"model.arch='no_such_arch' is not a model-zoo architecture"),
    ({"preset": "test-config-bse"}, ValueError, r"model.preset: unknown preset 'test-config-bse'; did you mean"),
    ({"preset": 3}, TypeError, r"model.preset must be a preset name"),
    ({"preset": "test-config-base", "arch": "switch_dit"}, ValueError, r"model.arch='switch_dit' contradicts"),
])
def test_arch_and_preset_errors(preset, model, error, match):
    with pytest.raises(error, match=match):
        from_dict({"model": model})
