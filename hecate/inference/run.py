"""A training run at inference time: load it, evaluate it, resolve --routing (incl. saved masks)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from hecate.moe.overrides import apply_mask_file, parse_routing, routing_overrides
from hecate.train.config import load_config
from hecate.train.generate import load_run

MASKS_DIR = "masks"  # RUN_DIR/masks/NAME.json, written by `hecate profile`
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def mask_path(run_dir, name: str) -> Path:
    if not _NAME.match(name):
        raise ValueError(f"mask name {name!r} may hold only letters, digits, '_', '-' and '.'")
    return Path(run_dir) / MASKS_DIR / f"{name}.json"


def load_mask(run_dir, name: str) -> dict:
    path = mask_path(run_dir, name)
    if not path.is_file():
        have = sorted(p.stem for p in (Path(run_dir) / MASKS_DIR).glob("*.json"))
        raise ValueError(f"--routing mask={name}: {path} does not exist; saved masks: {have or 'none'} "
                         f"(write one with `hecate profile {run_dir} --prompts A.txt --against B.txt --name {name}`)")
    mask = json.loads(path.read_text())
    if not isinstance(mask.get("disabled"), dict):
        raise ValueError(f"{path} is not a routing mask: it needs a 'disabled' object {{layer: [experts]}}")
    return mask


def routing_kwargs(run_dir, spec: Optional[str]) -> dict:
    """routing_overrides keywords of a --routing string; mask=NAME reads RUN_DIR/masks/NAME.json."""
    if not spec:
        return {}
    kw = parse_routing(spec)
    name = kw.pop("mask", None)
    if name is not None:
        kw = apply_mask_file(kw, load_mask(run_dir, name))
    return kw


def load_config_of(run_dir):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a training run directory: {path} is missing")
    return load_config(str(path))


@torch.no_grad()
def validation_loss(cfg, model, tokenizer, num_batches: Optional[int] = None) -> float:
    """Mean LM loss on the run's validation batches (as one process draws them)."""
    from hecate.train import tasks

    data = tasks.build_data(cfg, tokenizer)
    n = cfg.train.eval_batches if num_batches is None else num_batches
    if n < 1:
        raise ValueError(f"--batches must be >= 1, got {n}")
    device = next(model.parameters()).device
    model.eval()
    batches = data.val_batches(n, 0, 1)
    return sum(float(tasks.eval_loss(cfg, model, x.to(device), y.to(device), i))
               for i, (x, y) in enumerate(batches)) / len(batches)


def evaluate_run(run_dir, routing: Optional[str] = None, num_batches: Optional[int] = None) -> dict:
    """`hecate eval`: validation loss / perplexity of the run's newest checkpoint under --routing."""
    cfg = load_config_of(run_dir)
    model, tokenizer, step = load_run(run_dir)
    with routing_overrides(model, **routing_kwargs(run_dir, routing)):
        loss = validation_loss(cfg, model, tokenizer, num_batches)
    return {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "routing": routing or ""}
