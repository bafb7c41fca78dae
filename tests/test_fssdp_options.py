"""FssdpOptions is the one list of fssdp options: docs, config, strategy and manifest agree."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.parallel.fssdp.options import FssdpOptions
from hecate.train.checkpoint import _strategy_options
from hecate.train.config import load_config
from hecate.train.trainer import build_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "fssdp.md"

# A value other than the default for every option, written as YAML would be.
NON_DEFAULT_YAML = {
    "policy": "shadowing", "window": "3", "memory_slots": "2", "overlap_degree": "1",
    "bandwidth": "[1e9, 2.5e8]", "token_compute_s": "3e-7", "collective_latency_s": "0.001",
    "rematerialize": "false",
    "reshard_interval": "7", "calibrate": "true", "fit_replicas": "false", "prefetch": "false",
    "overlap_reduce": "false", "overlap_counts": "true", "overlap_dense_gather": "true",
    "balance_compute": "true",
}


def documented_keys() -> list[str]:
    """The keys of docs/fssdp.md's option table (the rows after its `| key |` header)."""
    lines = DOCS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | default |"))
    keys = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys.append(re.match(r"\| `([a-z_]+)` \|", line).group(1))
    return keys


def test_docs_list_exactly_the_dataclass_fields():
    assert documented_keys() == list(FssdpOptions.names())
    assert set(NON_DEFAULT_YAML) == set(FssdpOptions.names())


@pytest.mark.parametrize("key", documented_keys())
def test_every_documented_key_parses_and_reaches_the_strategy(key, tmp_path):
    cfg = load_config("tiny_fssdp", [f"parallel.fssdp.{key}={NON_DEFAULT_YAML[key]}",
                                     f"train.out_dir={tmp_path}"])
    value = getattr(cfg.parallel.fssdp, key)
    assert value != getattr(FssdpOptions(), key), f"the override of {key} did not change it"
    _, strategy = build_model(cfg, Topology(rank=0, world_size=1), "cpu")
    assert strategy.options == cfg.parallel.fssdp
    # The runtime reads the option, not a default of its own.
    assert getattr(strategy, "policy_name" if key == "policy" else key) == value
    manifest = _strategy_options(strategy)
    assert manifest == dataclasses.asdict(cfg.parallel.fssdp) | (
        {"bandwidth": list(value)} if key == "bandwidth" else {})


def test_all_non_defaults_at_once_and_bad_values_name_the_key(tmp_path):
    cfg = load_config("tiny_fssdp", [f"parallel.fssdp.{k}={v}" for k, v in NON_DEFAULT_YAML.items()])
    assert cfg.parallel.fssdp.bandwidth == (1e9, 2.5e8)
    assert all(getattr(cfg.parallel.fssdp, k) != getattr(FssdpOptions(), k) for k in NON_DEFAULT_YAML)
    with pytest.raises(ValueError, match=r"parallel\.fssdp\.bandwidth must be"):
        load_config("tiny_fssdp", ["parallel.fssdp.bandwidth=[1e9]"])
    with pytest.raises(ValueError, match=r"parallel\.fssdp\.token_compute_s must be > 0"):
        load_config("tiny_fssdp", ["parallel.fssdp.token_compute_s=0"])
    with pytest.raises(ValueError, match=r"unknown config key parallel\.fssdp\.bandwith.*did you mean"):
        load_config("tiny_fssdp", ["parallel.fssdp.bandwith=[1, 2]"])
    with pytest.raises(ValueError, match=r"unknown fssdp option\(s\) \['polcy'\]"):
        FssdpOptions().replace(polcy="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_bytes_follow_the_tokens_dtype(dtype):
    """The cost model prices a token row at hidden x the element size it travels in (not x 4)."""
    from hecate.moe.config import MoEConfig
    from hecate.moe.layer import MoELayer
    from hecate.parallel import build_strategy, parallelize

    strategy = build_strategy("fssdp", Topology(rank=0, world_size=1), policy="shadowing")
    layer = parallelize(MoELayer(MoEConfig(hidden_size=24, ffn_hidden_size=8, num_experts=4, top_k=2)),
                        strategy)
    x_TD = torch.zeros(5, 24, dtype=dtype)
    strategy._token_bytes = strategy._token_wire_bytes(x_TD)
    assert strategy._token_bytes == 24 * x_TD.element_size()
    cost = strategy._policy(layer.expert_layout, 0.0, False).cost_model  # what plans are priced with
    assert cost.token_bytes == 24 * x_TD.element_size()
