"""`hecate generate RUN_DIR`: sample text from a trained run's newest checkpoint, in one process.

The run's saved config rebuilds the model with all experts local (strategy `local`);
the sharded checkpoint is resharded on load, whatever strategy and world size wrote it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, parallelize
from hecate.train.checkpoint import load_checkpoint
from hecate.train.config import load_config
from hecate.train.sample import generate
from hecate.train.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer


def load_run(run_dir: str | Path):
    """(model with the newest checkpoint's weights, tokenizer, step) of a training run directory."""
    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{run} is not a training run directory: {config_path} is missing")
    cfg = load_config(str(config_path))
    ckpt = run / "checkpoints"
    if not ckpt.is_dir():
        raise ValueError(f"{run} has no checkpoints/; train with checkpoint.every > 0 to sample later")
    from hecate.train import tasks

    model = parallelize(tasks.build_model(cfg), build_strategy("local"))
    step = load_checkpoint(str(ckpt), model, model.moe_layers()[0].strategy if model.moe_layers()
                           else build_strategy("local"))
    if cfg.data.tokenizer == "bpe":
        tokenizer = BPETokenizer.load(run / TOKENIZER_FILE)
    else:
        tokenizer = ByteTokenizer()
    return model.eval(), tokenizer, step


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 40, num_samples: int = 1, seed: int = 0) -> list[str]:
    from hecate.train import tasks

    cfg = load_config(str(Path(run_dir) / "config.yaml")) if (Path(run_dir) / "config.yaml").is_file() else None
    if cfg is not None and tasks.arch_of(cfg) == "switch_dit":
        raise ValueError(f"{run_dir} trained an image model (switch_dit); sample it with `hecate sample {run_dir}`")
    model, tokenizer, _ = load_run(run_dir)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt must encode to at least one token")
    g = torch.Generator().manual_seed(seed)
    return [tasks.decode(cfg, tokenizer, generate(model, ids, max_new_tokens, temperature, top_k, g))
            for _ in range(num_samples)]
