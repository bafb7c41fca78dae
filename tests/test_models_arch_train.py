"""`hecate train` trains every model-zoo architecture from its YAML (hecate.train.tasks): the tiny
Switch-DiT and Mixture-of-Mamba configs under dp, ep and fssdp at W = 2 give the same losses
(the strategies compute one function), their loss falls, checkpoints reload for `hecate sample` /
`hecate generate`, `hecate inspect` reads every configs/models YAML, and each YAML is its preset."""
import json
from pathlib import Path

import pytest
import torch

from hecate.cli import main
from hecate.models.registry import PRESETS, get_preset, make_config
from hecate.testing import run_distributed
from hecate.train.config import load_config
from tests.arch_train_cases import train_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train_all_strategies(tmp_path, config, extra):
    runs = {}
    for strategy in ("dp", "ep", "fssdp"):
        out = tmp_path / strategy
        overrides = [f"parallel.strategy={strategy}", "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=1", "data.batch_size=2",
                     "logging.progress=false", "logging.heatmap=false", f"train.out_dir={out}",
                     "checkpoint.every=4", "sample.num_samples=0", *extra]
        summaries = run_distributed(train_config, 2, str(MODELS / config), overrides, timeout=300)
        assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
        runs[strategy] = (_losses(out), summaries[0])
    ref, _ = runs["dp"]
    for strategy, (losses, _) in runs.items():
        assert len(losses) == 4
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=0, atol=2e-3,
                                   msg=lambda m: f"{strategy} vs dp: {m}")
    return runs


def test_switch_dit_trains_under_every_strategy_and_samples(tmp_path, capsys):
    # 4 linear experts (top-2) so that ep at W = 2 holds 2 per rank; the preset's 3 need W = 3.
    runs = _train_all_strategies(tmp_path, "tiny-switch-dit.yaml", ["model.num_experts=4", "model.num_timesteps=50",
                                                                    "optim.lr=1e-2"])
    losses = runs["dp"][0]
    assert sum(losses[2:]) / 2 < sum(losses[:2]) / 2, losses
    assert main(["sample", str(tmp_path / "ep"), "--images", "3", "--labels", "0", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 images from step 4" in out
    from safetensors.torch import load_file

    images = load_file(str(tmp_path / "ep" / "samples.safetensors"))["images"]
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert (tmp_path / "ep" / "samples.ppm").read_bytes().startswith(b"P6\n")
    assert main(["generate", str(tmp_path / "ep")]) == 2
    assert "hecate sample" in capsys.readouterr().err


def test_mixture_of_mamba_trains_under_every_strategy_and_generates(tmp_path, capsys):
    runs = _train_all_strategies(tmp_path, "tiny-mixture-of-mamba-text.yaml",
                                 ["data.seq_len=24", "data.embedded_max_bytes=100000",
                                  f"data.cache_dir={tmp_path}/cache", "optim.lr=1e-2"])
    losses = runs["fssdp"][0]
    assert sum(losses[2:]) / 2 < sum(losses[:2]) / 2, losses
    assert main(["generate", str(tmp_path / "fssdp"), "--prompt", "def ", "--tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert "--- sample 0 ---" in text and "def " in text


@pytest.mark.parametrize("name", sorted(p.stem for p in MODELS.glob("*.yaml") if "\nstages:" not in p.read_text()))
def test_inspect_reads_every_model_config(name, capsys):
    assert main(["inspect", str(MODELS / f"{name}.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] >= info["active_params"] > 0


@pytest.mark.parametrize("preset", sorted(n for n, p in PRESETS.items() if p.arch not in ("transformer", "uni_moe"))
                         if get_preset("tiny-moh") else [])
def test_every_other_arch_preset_has_its_yaml(preset):
    cfg = load_config(str(MODELS / f"{preset}.yaml"), world_size=2)
    p = get_preset(preset)
    assert cfg.arch == p.arch and cfg.model == make_config(p.arch, p.config)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.source='embedded'.*switch_dit|use one of"):
        load_config(str(MODELS / "tiny-switch-dit.yaml"), ["data.source=embedded"])
    with pytest.raises(ValueError, match="parallel.ep_size=2 must divide the 3 experts"):
        load_config(str(MODELS / "tiny-switch-dit.yaml"), ["parallel.strategy=ep"], world_size=2)
    with pytest.raises(ValueError, match="model .switch_dit.: SwitchDiTConfig.patch_size"):
        load_config(str(MODELS / "tiny-switch-dit.yaml"), ["model.patch_size=3"])
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(str(MODELS / "tiny-switch-dit.yaml"), ["model.d_modle=3"])
    with pytest.raises(ValueError, match="modality_vocab_starts=\\[0, 256\\]"):
        load_config(str(MODELS / "tiny-mixture-of-mamba.yaml"), ["data.source=embedded"])


def test_saved_config_reloads_as_its_architecture(tmp_path):
    cfg = load_config(str(MODELS / "tiny-switch-dit.yaml"))
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.arch == "switch_dit" and again.model == cfg.model


def test_staged_config_is_rejected_by_hecate_train_with_the_way_to_run_it(capsys):
    assert main(["inspect", "tiny-uni-moe", "--json"]) == 0  # the preset inspects on the meta device
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "uni_moe" and info["moe_layers"] == 2
    with pytest.raises(ValueError, match="run_stages"):
        load_config(str(MODELS / "tiny-uni-moe.yaml"), ["stages=null"])


def test_transfusion_mamba_losses_and_training(tmp_path):
    from hecate.data.sources import TransfusionData

    p = get_preset("tiny-mixture-of-mamba-transfusion")
    from hecate.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(p.arch, dict(p.config, diffusion_loss_weight=0.0))
    x, y = TransfusionData(2, 48).train_batch(0)
    image = x[..., 1] == 1
    assert (y[image] == -100).all() and (y >= 0).any() and image.any()
    loss, out = model.loss(x, y, generator=torch.Generator().manual_seed(0))
    text = y >= 0
    ce = torch.nn.functional.cross_entropy(out.logits[text], y[text])
    torch.testing.assert_close(loss, ce + out.aux_loss)  # weight 0: text CE only
    assert out.mse > 0  # the diffusion term is computed on the image positions
    runs = _train_all_strategies(tmp_path, "tiny-mixture-of-mamba-transfusion.yaml", ["optim.lr=1e-2"])
    losses = runs["dp"][0]
    assert sum(losses[2:]) / 2 < sum(losses[:2]) / 2, losses
