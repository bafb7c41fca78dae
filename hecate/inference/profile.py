"""Expert routing profiles (MoTE) and frequency-based expert pruning of a training run.

Prompt files hold one prompt per non-empty line; each is cropped to the model's max_seq_len
and run alone. A layer's frequency of expert e is the share of the set's tokens that route
to e (among their top-k), so each layer's frequencies sum to top_k.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from hecate.inference.prune import prune_model
from hecate.inference.run import MASKS_DIR, load_config_of, mask_path, routing_kwargs, validation_loss
from hecate.moe.overrides import routing_overrides
from hecate.parallel import build_strategy, parallelize
from hecate.train.checkpoint import save_checkpoint, verify_checkpoint
from hecate.train.checkpoint_io import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_hex
from hecate.train.generate import load_run
from hecate.train.tokenizer import TOKENIZER_FILE


def read_prompts(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {p} does not exist")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {p} holds no non-empty line (one prompt per line)")
    return lines


@torch.no_grad()
def routing_frequency(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[L, E_max] fp64: per MoE layer, the share of tokens routed to each expert (0 past a layer's E)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer to profile")
    E = max(layer.config.num_experts for layer in layers)
    counts = torch.zeros(len(layers), E, dtype=torch.float64)
    tokens = 0
    device = next(model.parameters()).device
    model.eval()
    for text in prompts:
        ids = tokenizer.encode(text)[:model.cfg.max_seq_len]
        if not ids:
            continue
        out = model(torch.tensor([ids], device=device))
        for i, stats in enumerate(out.moe_stats):
            n = stats.tokens_per_expert_E.numel()
            counts[i, :n] += stats.tokens_per_expert_E.double().cpu()
        tokens += len(ids)
    if tokens == 0:
        raise ValueError("no prompt encoded to any token")
    return counts / tokens


def profile_run(run_dir, prompts_file, against_file, name: str = "mote", disable: int = 1,
                routing: Optional[str] = None) -> dict:
    """Rank every layer's experts by freq(A) - freq(B); save mask NAME disabling the `disable`
    experts per layer that A activates most above B (only those with a positive difference)."""
    mask_file = mask_path(run_dir, name)
    model, tokenizer, step = load_run(run_dir)
    if disable < 0:
        raise ValueError(f"--disable must be >= 0, got {disable}")
    with routing_overrides(model, **routing_kwargs(run_dir, routing)):
        fa = routing_frequency(model, tokenizer, read_prompts(prompts_file))
        fb = routing_frequency(model, tokenizer, read_prompts(against_file))
    diff = fa - fb
    layers, disabled = [], {}
    for i, layer in enumerate(model.moe_layers()):
        E, k = layer.config.num_experts, layer.config.top_k
        order = sorted(range(E), key=lambda e: (-float(diff[i, e]), e))
        n = min(disable, E - k)  # keep at least top_k experts enabled
        off = [e for e in order[:n] if diff[i, e] > 0]
        disabled[str(i)] = sorted(off)
        layers.append({"layer": i, "ranking": order, "freq_prompts": fa[i, :E].tolist(),
                       "freq_against": fb[i, :E].tolist(), "difference": diff[i, :E].tolist()})
    result = {"name": name, "step": step, "prompts": str(prompts_file), "against": str(against_file),
              "disabled": disabled, "layers": layers}
    mask_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(mask_file), result)
    return {**result, "path": str(mask_file)}


PRUNE_FILE = "prune.json"


def prune_run(run_dir, keep: int, calib_file, out_dir, val_batches: Optional[int] = None) -> dict:
    """Keep the `keep` most-used experts of every MoE layer (routing frequency on calib_file) and
    write a run directory out_dir with the smaller model: config.yaml (model.moe_experts_per_layer
    set, train.out_dir = out_dir, so `hecate train OUT/config.yaml --resume` fine-tunes it there),
    a verified weights-only checkpoint at the source step whose manifest records the pruning,
    the tokenizer file if any, and prune.json. The directory is assembled under a temporary name
    beside out_dir and renamed into place last: an interrupted prune leaves no partial run."""
    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve():
        raise ValueError("--out must differ from RUN_DIR (the original run stays as it is)")
    if (out / "checkpoints").exists():
        raise ValueError(f"--out {out} already holds checkpoints/; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory; choose a new one")
    cfg = load_config_of(run)
    model, tokenizer, step = load_run(run)
    for i, layer in enumerate(model.moe_layers()):
        c = layer.config
        if not c.top_k <= keep <= c.num_experts:
            raise ValueError(f"--keep {keep} must be in [top_k={c.top_k}, num_experts={c.num_experts}] "
                             f"for MoE layer {i}")
    calib = read_prompts(calib_file)
    freq = routing_frequency(model, tokenizer, calib)
    params_before = sum(p.numel() for p in model.parameters())
    experts_before = [layer.config.num_experts for layer in model.moe_layers()]
    loss_before = validation_loss(cfg, model, tokenizer, val_batches)
    keeps = []
    for i, layer in enumerate(model.moe_layers()):
        E = layer.config.num_experts
        order = sorted(range(E), key=lambda e: (-float(freq[i, e]), e))
        keeps.append(sorted(order[:keep]))
    prune_model(model, keeps)
    model = parallelize(model, build_strategy("local"))
    params_after = sum(p.numel() for p in model.parameters())
    loss_after = validation_loss(cfg, model, tokenizer, val_batches)
    report = {"run": str(run), "out": str(out), "step": step, "keep": keep, "kept_experts": keeps,
              "experts_before": experts_before,
              "calib": str(calib_file), "calib_sha256": sha256_hex(Path(calib_file).read_bytes()),
              "calib_prompts": len(calib),
              "calib_tokens": sum(len(tokenizer.encode(t)[:model.cfg.max_seq_len]) for t in calib),
              "calib_freq": freq.tolist(),
              "params_before": params_before, "params_after": params_after,
              "params_removed": params_before - params_after,
              "val_batches": cfg.train.eval_batches if val_batches is None else val_batches,
              "val_loss_before": loss_before, "val_loss_after": loss_after}
    cfg.model = model.cfg
    cfg.train.out_dir = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.prune-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        atomic_write_bytes(str(tmp / "config.yaml"), cfg.to_yaml().encode())
        if (run / TOKENIZER_FILE).is_file():
            atomic_write_bytes(str(tmp / TOKENIZER_FILE), (run / TOKENIZER_FILE).read_bytes())
        strategy = model.moe_layers()[0].strategy
        save_checkpoint(str(tmp / "checkpoints"), model, strategy, None, step, cfg.to_dict(),
                        extra={"pruned": {k: report[k] for k in ("run", "step", "kept_experts", "experts_before",
                                                                  "calib", "calib_sha256", "params_removed",
                                                                  "val_loss_before", "val_loss_after")}})
        verify_checkpoint(str(tmp / "checkpoints"))
        atomic_write_json(str(tmp / PRUNE_FILE), report)
        if out.exists():
            out.rmdir()  # empty (checked above): the rename below takes its place
        os.replace(tmp, out)
        fsync_dir(str(out.parent))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


__all__ = ["read_prompts", "routing_frequency", "profile_run", "prune_run", "MASKS_DIR", "PRUNE_FILE"]
