"""`hecate generate RUN_DIR` samples from a run's checkpoint, whatever layout saved it."""
import torch

from hecate.cli import main
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, parallelize
from hecate.train.checkpoint import save_checkpoint
from hecate.train.config import load_config
from hecate.train.engine import Engine
from hecate.train.generate import load_run


def _make_run(tmp_path):
    cfg = load_config("configs/tiny_fssdp.yaml")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    strategy = build_strategy("local")
    model = parallelize(MoETransformer(cfg.model), strategy)
    save_checkpoint(str(tmp_path / "checkpoints"), model, strategy, Engine(model, strategy), 7)
    return model


def test_generate_from_run(tmp_path, capsys):
    saved = _make_run(tmp_path)
    loaded, tokenizer, step = load_run(tmp_path)
    assert step == 7
    for (n, a), (_, b) in zip(sorted(saved.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), n
    assert main(["generate", str(tmp_path), "--prompt", "def f", "--tokens", "12", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "def f" in out


def test_generate_errors_name_the_problem(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    cfg = load_config("configs/tiny_fssdp.yaml")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert main(["generate", str(tmp_path)]) == 2
    assert "no checkpoints/" in capsys.readouterr().err
