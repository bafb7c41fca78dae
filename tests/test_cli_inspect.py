"""`hecate inspect` on model-zoo presets (built on the meta device) and `--list`.

The presets here are registered inside the tests, so they do not depend on the zoo's contents."""
import json
from dataclasses import dataclass

import pytest
from torch import nn

from hecate.cli import main
from hecate.models import registry
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer

# configs/tiny_dp.yaml's model as a preset of the `transformer` architecture
TINY = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
        "dense_ffn_hidden": 64, "moe_every": 1,
        "moe": {"hidden_size": 32, "num_experts": 4, "ffn_hidden_size": 32, "top_k": 2, "aux_loss_coeff": 0.01}}


@dataclass
class ToyConfig:
    d: int = 8
    num_experts: int = 4


class Toy(nn.Module):
    """A non-transformer architecture: an embedding and one MoE layer (top-1 of num_experts)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(10, cfg.d)
        self.moe = MoELayer(MoEConfig(hidden_size=cfg.d, ffn_hidden_size=16, num_experts=cfg.num_experts, top_k=1))


@pytest.fixture
def presets():
    registry._load_zoo()
    registry.register_preset("test-tiny-transformer", "transformer", TINY, "test preset")
    registry.register_arch("toy_test_arch", ToyConfig, Toy)
    registry.register_preset("test-toy", "toy_test_arch", {"d": 8, "num_experts": 4}, "toy")
    yield
    for name in ("test-tiny-transformer", "test-toy"):
        registry.PRESETS.pop(name, None)
    registry.ARCHITECTURES.pop("toy_test_arch", None)


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_transformer_preset_matches_its_config(presets, capsys):
    code, stdout, _ = _run(capsys, "inspect", "tiny_dp", "--json")
    from_config = json.loads(stdout)
    code, stdout, _ = _run(capsys, "inspect", "test-tiny-transformer", "--json", "--strategy", "dp", "--nproc", "2")
    assert code == 0
    info = json.loads(stdout)
    assert info["arch"] == "transformer"
    assert (info["total_params"], info["active_params"]) == (from_config["total_params"], from_config["active_params"])
    mem = info["memory_per_rank"]
    assert (mem["strategy"], mem["world_size"]) == ("dp", 2) and mem["activation_bytes"] > 0
    assert mem["param_state_bytes"] == 16 * info["total_params"]  # dp replicates everything
    code, stdout, _ = _run(capsys, "inspect", "test-tiny-transformer", "--json", "--strategy", "fssdp", "--nproc", "2")
    sharded = json.loads(stdout)["memory_per_rank"]
    routed = info["routed_expert_params"]
    # fssdp: experts sharded (16 B per element on 1/W), dense weights + grads whole (8 B) and their
    # AdamW moments sharded too (8 B on 1/W, parallel.dense_optimizer=auto).
    dense = info["total_params"] - routed
    assert sharded["param_state_bytes"] == 16 * (routed // 2) + 8 * dense + 8 * dense // 2
    code, stdout, _ = _run(capsys, "inspect", "tiny_dp", "--strategy", "fssdp", "--nproc", "2", "--json")
    from_file = json.loads(stdout)["memory_per_rank"]  # --strategy works on config files too
    assert (from_file["strategy"], from_file["param_state_bytes"]) == ("fssdp", sharded["param_state_bytes"])
    code, stdout, _ = _run(capsys, "inspect", "test-tiny-transformer")
    assert code == 0 and "preset test-tiny-transformer (arch transformer)" in stdout and "activations" in stdout


def test_other_arch_preset_gets_a_param_and_optimizer_estimate(presets, capsys):
    code, stdout, _ = _run(capsys, "inspect", "test-toy", "--json", "--strategy", "ep", "--nproc", "2")
    assert code == 0
    info = json.loads(stdout)
    toy = Toy(ToyConfig())
    total = sum(p.numel() for p in toy.parameters())
    routed = sum(p.numel() for p in toy.moe.experts.parameters())
    assert info["total_params"] == total and info["routed_expert_params"] == routed
    assert info["active_params"] == total - routed + routed // 4  # top-1 of 4 experts
    mem = info["memory_per_rank"]
    assert (mem["strategy"], mem["world_size"]) == ("ep", 2) and "activation_bytes" not in mem
    assert mem["param_state_bytes"] == 16 * (total - routed + routed // 2)
    code, stdout, _ = _run(capsys, "inspect", "test-toy", "--strategy", "fsdp", "--nproc", "4")
    assert code == 0 and "memory per rank (fsdp, world 4)" in stdout


@pytest.mark.parametrize("args,match", [
    (["test-tiy"], r"'test-tiy' is neither a config file.*did you mean 'test-toy'"),
    (["test-toy", "--strategy", "ep", "--nproc", "3"], r"--nproc=3 must divide num_experts=4"),
    (["test-toy", "--strategy", "dpp"], r"--strategy='dpp' must be one of"),
    (["test-toy", "--nproc", "0"], r"--nproc=0 must be >= 1"),
    (["test-toy", "--set", "optim.lr=1"], r"--set applies to config files"),
    (["test-tiny-transformer", "--strategy", "ep", "--nproc", "3"], r"parallel.ep_size=3 must divide"),
    ([], r"needs a CONFIG_OR_PRESET argument"),
])
def test_inspect_preset_errors(presets, capsys, args, match):
    import re

    code, _, stderr = _run(capsys, "inspect", *args)
    assert code == 2 and re.search(match, stderr), stderr


def test_inspect_list(presets, capsys):
    code, stdout, _ = _run(capsys, "inspect", "--list")
    assert code == 0 and "tiny_dp" in stdout and "test-toy" in stdout and "toy_test_arch" in stdout
    code, stdout, _ = _run(capsys, "inspect", "--list", "--json")
    listing = json.loads(stdout)
    assert "demo" in listing["configs"]
    assert listing["presets"]["test-tiny-transformer"] == {"arch": "transformer", "description": "test preset"}


def test_inspect_takes_a_run_directory(tmp_path, capsys):
    from hecate.train.config import configs_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((configs_dir() / "tiny_dp.yaml").read_text())
    code, stdout, _ = _run(capsys, "inspect", str(run), "--json")
    _, from_name, _ = _run(capsys, "inspect", "tiny_dp", "--json")
    assert code == 0 and json.loads(stdout) == json.loads(from_name)
    (tmp_path / "empty").mkdir()
    code, _, stderr = _run(capsys, "inspect", str(tmp_path / "empty"))
    assert code == 2 and "without a config.yaml" in stderr
