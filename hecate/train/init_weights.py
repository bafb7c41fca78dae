"""`hecate train CONFIG --init RUN_DIR`: start a run (step 0, fresh optimizer) from the weights
of another directory: the output of `hecate convert --from-hf` (RUN_DIR/model.safetensors) or
a training run (its newest checkpoint under RUN_DIR/checkpoints/). Works under any strategy
and world size (the checkpoint loaders reassemble and re-shard the experts).

The model section of RUN_DIR/config.yaml must compute the same function as the new config's:
only training knobs (balancing-loss weights, capacity in eval, ...) may differ; anything
else is refused naming the key, since loading weights into a different model is a silent
wrong answer.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

INIT_WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
# model.* keys a continued run may change: they steer training, not what the weights compute.
MAY_DIFFER = {"max_seq_len", "moh_balance_coeff"}
MOE_MAY_DIFFER = {"aux_loss_coeff", "z_loss_coeff", "seq_aux_loss_coeff", "expert_balance_coeff",
                  "device_balance_coeff", "num_devices", "bias_update_rate", "capacity_factor",
                  "eval_capacity_factor", "min_capacity", "drop_policy", "jitter_eps"}


def saved_model_section(run_dir: Path) -> dict:
    path = run_dir / CONFIG
    if not path.is_file():
        raise ValueError(f"--init {run_dir}: {path} is missing (RUN_DIR must come from `hecate convert "
                         "--from-hf` or be a training run's out_dir)")
    data = yaml.safe_load(path.read_text()) or {}
    model = data.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"--init {run_dir}: {path} has no model section")
    return model


def check_same_model(model_cfg, saved: dict, run_dir: Path) -> None:
    """ValueError naming every model key that differs between the new config and RUN_DIR's."""
    mine = dataclasses.asdict(model_cfg)
    diffs = []
    for k in sorted(set(mine) | set(saved)):
        if k in MAY_DIFFER:
            continue
        if k == "moe":
            a, b = mine.get("moe") or {}, saved.get("moe") or {}
            diffs += [(f"moe.{mk}", a.get(mk), b.get(mk)) for mk in sorted(set(a) | set(b))
                      if mk not in MOE_MAY_DIFFER and a.get(mk) != b.get(mk)]
        elif mine.get(k) != saved.get(k):
            a, b = mine.get(k), saved.get(k)
            if isinstance(a, tuple) or isinstance(b, tuple):  # YAML reads tuples back as lists
                a, b = list(a) if a is not None else a, list(b) if b is not None else b
            if a != b:
                diffs.append((k, mine.get(k), saved.get(k)))
    if diffs:
        shown = "; ".join(f"model.{k}: config {a!r}, {run_dir / CONFIG} {b!r}" for k, a, b in diffs[:8])
        raise ValueError(f"--init {run_dir}: the model differs from the one the weights belong to ({shown}); "
                         f"copy the model section of {run_dir / CONFIG} into the config")


def load_initial_weights(run_dir, model, strategy, model_cfg, topology=None) -> str:
    """Load RUN_DIR's weights into `model` under `strategy` (collective: call on every rank).
    Returns the file or checkpoint directory read."""
    from hecate.train import checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--init {run_dir}: not a directory")
    check_same_model(model_cfg, saved_model_section(run_dir), run_dir)
    weights = run_dir / INIT_WEIGHTS
    if weights.is_file():
        checkpoint.import_safetensors(weights, model, strategy)
        return str(weights)
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        checkpoint.load_checkpoint(str(ckpts), model, strategy, None, topology)
        return str(ckpts)
    raise ValueError(f"--init {run_dir}: neither {weights} nor {ckpts}/ exists")
